//! Outbound HTTP: one `reqwest` client (platform roots plus an optional extra CA bundle,
//! pinned host names, timeouts) shared by the Azure SDK clients and the Entra exchange,
//! and the broker's own managed identity credential built on it (AKS workload identity at
//! the configured cloud's authority host, reading the environment it is given). Every answer
//! is read up to a bound: the broker's own reads through `body_within`, the SDK's through
//! the transport's `Bounded`. When an attempt's request was written (`WriteWatch`), and how
//! a failed connection is told to a person (`error_chain`).

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{
    AsyncRawResponse, ClientOptions, HttpClient, Request, RetryOptions, Transport,
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
};
use futures::StreamExt;
use url::Url;

use tracing::Instrument;

use crate::config::{IdentityConfig, IdentitySource, OutboundConfig};
use crate::entra::EntraError;
use crate::metrics::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot read the extra CA bundle {path}: {message}")]
    CaBundle { path: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("cannot set up the managed identity credential ({source_kind:?}): {message}")]
    Identity {
        source_kind: IdentitySource,
        message: String,
    },
    /// An answer longer than its reader's bound (`body_within`).
    #[error("the answer is larger than {} KiB", .limit / 1024)]
    TooLarge { limit: usize },
    /// An answer whose body broke off (`body_within`).
    #[error("the answer broke off: {0}")]
    Body(String),
    /// An answer an SDK client read longer than its upstream's bound (`Bounded`).
    #[error(
        "{upstream}'s answer is larger than {} KiB, more than it ever sends: a proxy or gateway may have answered",
        .limit / 1024
    )]
    AnswerTooLarge {
        upstream: &'static str,
        limit: usize,
    },
    /// A 401 in Key Vault's place without Key Vault's bearer challenge (`KeyVaultAnswers`):
    /// `scheme`, the challenge's first word as the answer named it.
    #[error(
        "HTTP 401 without Key Vault's bearer challenge ({scheme}): a proxy or gateway may have answered, asking for a sign-in of its own"
    )]
    NotKeyVaultsChallenge {
        scheme: String,
        retry_after: Option<std::time::Duration>,
    },
    /// A redirect (3xx) in `upstream`'s place, not followed (`not_followed`): neither Key
    /// Vault nor the managed identity endpoint redirects, so something else answered. A
    /// permanent one (`permanent_redirect`) says the address asked is not `upstream`'s.
    #[error(
        "HTTP {status} redirect {target}, not followed: {upstream} never redirects, so {}",
        redirect_cause(*.status, upstream)
    )]
    Redirect {
        upstream: &'static str,
        status: u16,
        /// Where to, for people (`redirect_target`).
        target: String,
        retry_after: Option<std::time::Duration>,
    },
}

impl OutboundError {
    /// A permanent redirect in its upstream's place: the configuration's, not an outage.
    pub fn is_permanent_redirect(&self) -> bool {
        matches!(self, OutboundError::Redirect { status, .. } if permanent_redirect(*status))
    }
}

/// Whether a redirect of `status` is for good (301, 308): the address asked is not the
/// service's, and asking it again will not change that.
pub fn permanent_redirect(status: u16) -> bool {
    matches!(status, 301 | 308)
}

fn redirect_cause(status: u16, upstream: &str) -> String {
    if permanent_redirect(status) {
        format!("the address asked is not {upstream}'s")
    } else {
        "a proxy or gateway answered (sending the broker to a sign-in of its own, say)".into()
    }
}

/// A redirect's target for people: "to" its `location` resolved against `base` (the URL
/// asked), of which only the scheme, host, port and path are shown, as its query (or user
/// info) could carry anything the answerer put there.
pub fn redirect_target(location: Option<&str>, base: Option<&Url>) -> String {
    let Some(l) = location else {
        return "without a Location".to_owned();
    };
    let url = match base {
        Some(b) => b.join(l).ok(),
        None => Url::parse(l).ok(),
    };
    match url {
        Some(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            format!("to {}", u.as_str().chars().take(200).collect::<String>())
        }
        None => "to an unreadable Location".to_owned(),
    }
}

/// The value of the header `name` (any case) among `headers`.
fn header<'a>(headers: &'a azure_core::http::headers::Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The answer of `status` with `headers` to a request for `asked`, a redirect in
/// `upstream`'s place, as an error no SDK retry policy retries (`OutboundError::Redirect`).
fn not_followed(
    upstream: &'static str,
    status: u16,
    headers: &azure_core::http::headers::Headers,
    asked: &Url,
) -> azure_core::Error {
    let retry_after = crate::resilience::retry_after(
        |name| header(headers, name).map(str::to_owned),
        std::time::SystemTime::now(),
    );
    azure_core::Error::new(
        ErrorKind::Other,
        OutboundError::Redirect {
            upstream,
            status,
            target: redirect_target(header(headers, "location"), Some(asked)),
            retry_after,
        },
    )
}

/// Answers of `upstream` (Key Vault) whose redirects are failed as `not_followed`: the SDK
/// took them for the service's error without its error body, "HTTP 302 without a Key
/// Vault error", retried and with the target unnamed, a permanent one included.
#[derive(Debug)]
struct NotFollowed {
    inner: Arc<dyn HttpClient>,
    upstream: &'static str,
}

#[async_trait]
impl HttpClient for NotFollowed {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = self.inner.execute_request(request).await?;
        let status = u16::from(response.status());
        if (300..400).contains(&status) {
            return Err(not_followed(
                self.upstream,
                status,
                response.headers(),
                request.url(),
            ));
        }
        Ok(response)
    }
}

/// The redirect in an upstream's place under `e` (`not_followed`).
pub fn redirect(e: &azure_core::Error) -> Option<&OutboundError> {
    causes(e).find_map(|c| {
        c.downcast_ref::<OutboundError>()
            .filter(|o| matches!(o, OutboundError::Redirect { .. }))
    })
}

/// The most of one answer the Key Vault clients read. Key Vault's largest, a certificate read
/// with its chain, are a few KiB; this bounds only what a proxy, gateway or captive portal in
/// its place could make the broker hold.
pub const KEY_VAULT_ANSWER_LIMIT: usize = 1024 * 1024;

/// The most of one answer read for the broker's own identity: the managed identity endpoint
/// (IMDS, App Service) and Entra for the workload identity. A token answer is a few KiB (a
/// managed identity's token carries no group claims) and an error less: 64 KiB leaves them
/// ample room and is still little to hold for every key's fetch failing at once.
pub const IDENTITY_ANSWER_LIMIT: usize = 64 * 1024;

/// IMDS's address, which `azure_identity` asks and `identity.imds_endpoint` replaces.
const IMDS_HOST: &str = "169.254.169.254";

/// Who answers the managed identity credential (IMDS or App Service), as messages name it.
pub const IDENTITY_ENDPOINT: &str = "the managed identity endpoint";

/// Builds the shared outbound client. TLS verification is always on; extra trust is added,
/// never substituted. A proxy the environment names (`HTTPS_PROXY`, `NO_PROXY`, …) carries
/// its requests, as egress through a proxy is set up.
pub fn http_client(cfg: &OutboundConfig) -> Result<reqwest::Client, OutboundError> {
    builder(cfg)?
        .build()
        .map_err(|e| OutboundError::Client(e.to_string()))
}

/// The client for the host's own managed identity endpoint (IMDS at its link-local address,
/// App Service's on the host): as `http_client`, but never through a proxy, which does not
/// reach the host's endpoint (Microsoft: IMDS behind a proxy is unsupported). Through one,
/// every request got the proxy's refusal, told as the endpoint's refusal of the identity.
pub fn host_client(cfg: &OutboundConfig) -> Result<reqwest::Client, OutboundError> {
    builder(cfg)?
        .no_proxy()
        .build()
        .map_err(|e| OutboundError::Client(e.to_string()))
}

/// The outbound clients: `shared` for Entra and Key Vault, `host` for the host's own managed
/// identity endpoint (`host_client`).
#[derive(Debug, Clone)]
pub struct HttpClients {
    pub shared: reqwest::Client,
    pub host: reqwest::Client,
}

/// Both outbound clients of `cfg`.
pub fn http_clients(cfg: &OutboundConfig) -> Result<HttpClients, OutboundError> {
    Ok(HttpClients {
        shared: http_client(cfg)?,
        host: host_client(cfg)?,
    })
}

fn builder(cfg: &OutboundConfig) -> Result<reqwest::ClientBuilder, OutboundError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &cfg.extra_ca_file {
        builder = builder.tls_certs_merge(extra_ca_certs(path)?);
    }
    for (host, ip) in &cfg.pin_hosts {
        // DNS has no ports: the port in the URL is used, this one is ignored.
        builder = builder.resolve(host, SocketAddr::new(*ip, 443));
    }
    Ok(builder)
}

/// The certificates of the extra CA bundle at `path` (`outbound.extra_ca_file`), to add to
/// the platform's roots: at least one, or an error naming the file.
pub fn extra_ca_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, OutboundError> {
    let unreadable = |message: String| OutboundError::CaBundle {
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    let certs =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(unreadable("no PEM certificates found".into()));
    }
    Ok(certs)
}

/// The Key Vault clients' options: no SDK retry (the broker retries them), Key Vault's
/// refusal (401) of the broker's token passed to `credential`, which drops it
/// (`RefusedTokens`), and answers read up to `KEY_VAULT_ANSWER_LIMIT` (`Bounded`).
pub fn key_vault_options(
    http: &reqwest::Client,
    credential: Arc<crate::identity::CachingCredential>,
) -> ClientOptions {
    let inner = Arc::new(RefusedTokens {
        inner: Arc::new(NotFollowed {
            inner: Arc::new(Bounded {
                inner: Arc::new(Watched(http.clone())),
                limit: KEY_VAULT_ANSWER_LIMIT,
                upstream: crate::signer::keyvault::SERVICE,
            }),
            upstream: crate::signer::keyvault::SERVICE,
        }),
        credential,
    });
    traced_options(inner, RetryOptions::none(), None)
}

/// Tells the broker's caching credential of a token Key Vault refused with 401 (expired by
/// Key Vault's clock, revoked, a continuous access evaluation challenge), before the SDK's
/// bearer policy answers the challenge by asking the credential again: it then gets a new
/// token rather than the cached one, refused again until its half-life refresh, hours on.
/// Seen here because only the transport sees both the token sent and the answer.
/// A 401 without Key Vault's bearer challenge (a gateway's `WWW-Authenticate: Negotiate`,
/// or none) is not Key Vault's and is failed here, named (`OutboundError::NotKeyVaultsChallenge`):
/// the SDK took such a challenge for a bug (its "no scope or resource in authentication
/// challenge", an internal error remembered as the configuration's), or a missing one for
/// the vault's refusal of the token.
#[derive(Debug)]
struct RefusedTokens {
    inner: Arc<dyn HttpClient>,
    credential: Arc<crate::identity::CachingCredential>,
}

/// Whether a `WWW-Authenticate` value carries what the Key Vault SDK reads from Key Vault's
/// challenge (its `scope` or `resource`, as `KeyVaultAuthorizer` finds them).
fn bearer_challenge(value: &str) -> bool {
    value.contains("scope=\"") || value.contains("resource=\"")
}

/// A challenge's scheme for people: its first word, if it is a short one; never the rest
/// (a gateway's `Negotiate` may carry a token).
fn challenge_scheme(value: Option<&str>) -> String {
    match value.map(|v| v.split([' ', ',']).next().unwrap_or_default()) {
        None => "no WWW-Authenticate".into(),
        Some(w)
            if !w.is_empty()
                && w.len() <= 32
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) =>
        {
            format!("WWW-Authenticate: {w}")
        }
        Some(_) => "a WWW-Authenticate that names no scheme".into(),
    }
}

#[async_trait]
impl HttpClient for RefusedTokens {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = self.inner.execute_request(request).await?;
        if response.status() == azure_core::http::StatusCode::Unauthorized {
            let challenge = response
                .headers()
                .get_optional_str(&azure_core::http::headers::WWW_AUTHENTICATE);
            if !challenge.is_some_and(bearer_challenge) {
                let retry_after = crate::resilience::retry_after(
                    |name| {
                        response
                            .headers()
                            .iter()
                            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.as_str().to_owned())
                    },
                    std::time::SystemTime::now(),
                );
                return Err(azure_core::Error::new(
                    ErrorKind::Other,
                    OutboundError::NotKeyVaultsChallenge {
                        scheme: challenge_scheme(challenge),
                        retry_after,
                    },
                ));
            }
        }
        if response.status() == azure_core::http::StatusCode::Unauthorized
            && let Some(token) = request
                .headers()
                .get_optional_str(&azure_core::http::headers::AUTHORIZATION)
                .and_then(|v| v.strip_prefix("Bearer "))
            && self.credential.refused(token)
        {
            tracing::warn!(
                host = request.url().host_str().unwrap_or_default(),
                "Key Vault refused the broker's managed identity token (401); asking for a new one"
            );
        }
        Ok(response)
    }
}

/// The shared client, with IMDS's address sent to `imds` when one is configured.
fn sender(http: &reqwest::Client, imds: Option<&Url>) -> Arc<dyn HttpClient> {
    match imds {
        Some(url) => Arc::new(ImdsRedirect {
            inner: http.clone(),
            target: url.clone(),
        }),
        None => Arc::new(http.clone()),
    }
}

/// Client options whose transport (`inner`) injects W3C trace context; requests of the
/// managed identity credential (`upstream`) also get a span and a metric of their own.
fn traced_options(
    inner: Arc<dyn HttpClient>,
    retry: RetryOptions,
    upstream: Option<Upstream>,
) -> ClientOptions {
    let transport: Arc<dyn HttpClient> = Arc::new(Traced { inner, upstream });
    ClientOptions {
        transport: Some(Transport::new(transport)),
        retry,
        ..Default::default()
    }
}

/// The SDK retry of the broker's identity credentials (workload identity, App Service):
/// none. Their token is asked for inside an attempt of the broker's (a Key Vault call, or a
/// federated tenant's assertion), which the broker retries on its own clock, honouring the
/// answer's `Retry-After`, within the fetch's budget and behind its breakers; a retry of the
/// SDK's (about 7 s of 408, 429 and 5xx) spent that budget inside one attempt, so an outage
/// ended as the budget's cut-off instead of Entra's answer. A refresh of a cached token that
/// fails is tried again after `identity::REFRESH_RETRY`. The IMDS source replaces this with
/// Microsoft's IMDS rules (`azure_identity`), which `EndpointAnswers` ends after one request.
fn identity_retry() -> RetryOptions {
    RetryOptions::none()
}

/// The broker's own identity: a managed identity (IMDS or App Service) or AKS workload
/// identity, behind `identity::CachingCredential` (tokens refreshed at half-life and served
/// while a refresh fails, within the endpoint's limits). `env` is the environment the
/// broker reads (the process's, but in tests). Workload identity takes everything from it:
/// the SDK is given the client id, tenant, token file and authority host. The managed
/// identity credential (`auto`, `imds`, `app_service`) cannot be: `azure_identity` 1.0's
/// `ManagedIdentityCredential` takes no environment and no endpoint (its options' environment
/// exists only in that crate's own tests; its App Service and IMDS credentials are private),
/// so it reads the process's variables itself, `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
/// among them: at construction to choose App Service or IMDS whichever of the three sources
/// is configured, and the header again at every request. `env` serves only the check that
/// `app_service` has its variables; IMDS's fixed address alone can be redirected
/// (`identity.imds_endpoint`, in the transport).
pub fn credential(
    identity: &IdentityConfig,
    http: &HttpClients,
    env: crate::config::EnvSource<'_>,
) -> Result<Arc<crate::identity::CachingCredential>, OutboundError> {
    let from_env = read_env(identity, env)?;
    let first = build_credential(identity, from_env.as_ref(), http)?;
    // A new SDK credential (with an empty token cache of its own) replaces one whose token a
    // service refused: its cache cannot be emptied, and would answer with the refused token.
    let (identity, http) = (identity.clone(), http.clone());
    let renew = move || build_credential(&identity, from_env.as_ref(), &http).ok();
    Ok(Arc::new(
        crate::identity::CachingCredential::new(first).renewed_by(Box::new(renew)),
    ))
}

/// The `azure_identity` credential for the configured source, with the environment `env`.
#[cfg(test)]
fn sdk_credential(
    identity: &IdentityConfig,
    http: &HttpClients,
    env: crate::config::EnvSource<'_>,
) -> Result<Arc<dyn TokenCredential>, OutboundError> {
    build_credential(identity, read_env(identity, env)?.as_ref(), http)
}

/// What the configured source takes from `env`: workload identity's variables and authority
/// host (none for the managed identity credential, which reads the process's itself).
fn read_env(
    identity: &IdentityConfig,
    env: crate::config::EnvSource<'_>,
) -> Result<Option<(crate::config::WorkloadIdentityEnv, Url)>, OutboundError> {
    let err = |message: String| OutboundError::Identity {
        source_kind: identity.source,
        message,
    };
    if identity.source == IdentitySource::AppService
        && (env("IDENTITY_ENDPOINT").is_none() || env("IDENTITY_HEADER").is_none())
    {
        return Err(err(
            "identity.source is app_service but IDENTITY_ENDPOINT and IDENTITY_HEADER are not set: is managed identity enabled on the app?".into(),
        ));
    }
    if identity.source != IdentitySource::WorkloadIdentity {
        return Ok(None);
    }
    // Read and checked here, so a pod without the webhook's variables is told which are
    // missing and what sets them, not the SDK's first complaint.
    let wi =
        crate::config::workload_identity_env(identity.client_id.as_deref(), env).map_err(err)?;
    // Always given, so the SDK never reads AZURE_AUTHORITY_HOST from the process itself: the
    // configured cloud's authority, else that variable from `env`.
    let authority =
        crate::config::workload_identity_authority(identity.cloud_authority.as_ref(), env)
            .map_err(err)?;
    Ok(Some((wi, authority)))
}

/// The `azure_identity` credential for the configured source; `wi`, workload identity's
/// variables and authority host (`read_env`).
fn build_credential(
    identity: &IdentityConfig,
    wi: Option<&(crate::config::WorkloadIdentityEnv, Url)>,
    http: &HttpClients,
) -> Result<Arc<dyn TokenCredential>, OutboundError> {
    let err = |message: String| OutboundError::Identity {
        source_kind: identity.source,
        message,
    };
    match (identity.source, wi) {
        (IdentitySource::WorkloadIdentity, Some((wi, authority))) => {
            let mut cloud = CustomConfiguration::default();
            cloud.authority_host = authority.to_string();
            let mut client_options = traced_options(
                Arc::new(ReadableEntraErrors {
                    inner: Arc::new(Bounded {
                        inner: Arc::new(http.shared.clone()),
                        limit: IDENTITY_ANSWER_LIMIT,
                        upstream: "Entra ID",
                    }),
                }),
                identity_retry(),
                Some(Upstream::ManagedIdentity),
            );
            client_options.cloud = Some(Arc::new(CloudConfiguration::Custom(cloud)));
            workload_identity_credential(wi, client_options).map_err(|e| err(e.to_string()))
        }
        (IdentitySource::WorkloadIdentity, None) => {
            Err(err("workload identity's variables were not read".into()))
        }
        (IdentitySource::Auto | IdentitySource::Imds | IdentitySource::AppService, _) => {
            let traced = Arc::new(Traced {
                inner: Arc::new(Bounded {
                    inner: sender(&http.host, identity.imds_endpoint.as_ref()),
                    limit: IDENTITY_ANSWER_LIMIT,
                    upstream: IDENTITY_ENDPOINT,
                }),
                upstream: Some(Upstream::ManagedIdentity),
            });
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: identity.client_id.clone().map(UserAssignedId::ClientId),
                client_options: ClientOptions {
                    transport: Some(Transport::new(Arc::new(EndpointAnswers {
                        inner: traced,
                        imds: identity.imds_endpoint.clone(),
                    }))),
                    retry: identity_retry(),
                    ..Default::default()
                },
            };
            let c =
                ManagedIdentityCredential::new(Some(options)).map_err(|e| err(e.to_string()))?;
            Ok(c)
        }
    }
}

/// Workload identity's credential: the projected service account token in `wi.token_file`
/// exchanged at Entra (`client_options`: its authority host and transport), Entra's refusals
/// read as its answers (`EntraAnswers`).
fn workload_identity_credential(
    wi: &crate::config::WorkloadIdentityEnv,
    client_options: ClientOptions,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let c = ClientAssertionCredential::new(
        wi.tenant_id.clone(),
        wi.client_id.clone(),
        ProjectedToken {
            path: wi.token_file.clone(),
        },
        Some(ClientAssertionCredentialOptions { client_options }),
    )?;
    Ok(Arc::new(EntraAnswers { inner: c }))
}

/// The longest projected service account token read: a few KiB in practice.
const PROJECTED_TOKEN_LIMIT: u64 = 64 * 1024;

/// The projected service account token, read from its file each time one is needed: the
/// kubelet replaces the file well before the token in it expires (at 80% of its life), and
/// `azure_identity`'s own workload identity credential keeps what it read for 10 minutes,
/// so with a token of the shortest life Kubernetes allows (10 minutes, replaced after 8) it
/// sent a token expired for minutes. It is read only when the identity's token is fetched
/// (at half that token's life, `identity::CachingCredential`), on the blocking pool.
#[derive(Debug)]
struct ProjectedToken {
    path: std::path::PathBuf,
}

#[async_trait]
impl ClientAssertion for ProjectedToken {
    async fn secret(
        &self,
        _: Option<azure_core::http::ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut token = String::new();
            std::fs::File::open(&path)?
                .take(PROJECTED_TOKEN_LIMIT + 1)
                .read_to_string(&mut token)?;
            Ok::<_, std::io::Error>(token)
        })
        .await;
        let unreadable = |why: String| {
            azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "cannot read the workload identity's token file {}: {why}",
                    self.path.display()
                ),
            )
        };
        match read {
            Ok(Ok(token)) if token.len() as u64 > PROJECTED_TOKEN_LIMIT => Err(unreadable(
                format!("larger than {} KiB", PROJECTED_TOKEN_LIMIT / 1024),
            )),
            // A JWT holds no whitespace: a line end written after it by hand is not part of it.
            Ok(Ok(token)) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
            Ok(Ok(_)) => Err(unreadable("it is empty".into())),
            Ok(Err(e)) => Err(unreadable(e.to_string())),
            Err(e) => Err(unreadable(e.to_string())),
        }
    }
}

/// The managed identity endpoint's failed answers (and failures to reach it) as errors the
/// SDK does not retry: `azure_identity` replaces the IMDS credential's retry options with
/// Microsoft's IMDS rules (404, 410, 429 and 5xx retried for up to 72 s), which no option
/// bounds. Inside one attempt of the broker's that spent the fetch's whole budget, so a 500
/// answered in milliseconds ended as Key Vault's cut-off 10 s later. One request per attempt
/// instead; the broker retries (its attempts, backoff at least the answer's `Retry-After`,
/// budget), and the caller is told the endpoint's status. The answer is kept under the error
/// (`signer::keyvault::endpoint_refusal`).
#[derive(Debug)]
struct EndpointAnswers {
    inner: Arc<dyn HttpClient>,
    /// Where IMDS's address is sent instead (`ImdsRedirect`), named as what answered.
    imds: Option<Url>,
}

#[async_trait]
impl HttpClient for EndpointAnswers {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = match self.inner.execute_request(request).await {
            Ok(r) if r.status().is_success() => return Ok(r),
            Ok(r) => r,
            // Io and Connection errors are what the SDK's retry policy retries.
            Err(e) if matches!(e.kind(), ErrorKind::Io | ErrorKind::Connection) => {
                return Err(azure_core::Error::with_error(
                    ErrorKind::Other,
                    e,
                    "the managed identity endpoint could not be reached",
                ));
            }
            Err(e) => return Err(e),
        };
        let asked = match &self.imds {
            Some(target) if request.url().host_str() == Some(IMDS_HOST) => {
                let mut sent = request.url().clone();
                // As `ImdsRedirect` sent it, so a relative Location resolves as it would.
                let _ = sent.set_scheme(target.scheme());
                let _ = sent.set_host(target.host_str());
                let _ = sent.set_port(target.port_or_known_default());
                sent
            }
            _ => request.url().clone(),
        };
        let code = u16::from(response.status());
        if (300..400).contains(&code) {
            return Err(not_followed(
                IDENTITY_ENDPOINT,
                code,
                response.headers(),
                &asked,
            ));
        }
        let (status, headers, body) = response.deconstruct();
        let body = body.collect().await?;
        let message = endpoint_message(u16::from(status), &body, &asked);
        Err(azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status,
                error_code: None,
                raw_response: Some(Box::new(azure_core::http::RawResponse::from_bytes(
                    status, headers, body,
                ))),
            },
            message,
        ))
    }
}

/// The endpoint's failed answer for people: its status and, from its JSON error, the
/// `error_description` (IMDS: "Identity not found") or `message` (App Service: "Unable to
/// load the proper Managed Identity."), bounded. Any other body is not the endpoint's (a
/// proxy's or gateway's page, which could echo the request): not quoted, and what answered
/// named by the address asked (`url`'s host and port).
fn endpoint_message(status: u16, body: &[u8], url: &Url) -> String {
    match endpoint_error(status, body) {
        Some(d) if !d.is_empty() => format!("{IDENTITY_ENDPOINT} answered HTTP {status}: {d}"),
        Some(_) => format!("{IDENTITY_ENDPOINT} answered HTTP {status}"),
        None => {
            let host = url.host_str().unwrap_or_default();
            let at = match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            };
            format!(
                "HTTP {status} without the managed identity endpoint's error in the body, from {at}: a proxy or gateway may have answered"
            )
        }
    }
}

/// The managed identity endpoint's own JSON error in `body`, an answer of `status`, its
/// description bounded (empty when it has none), in the shapes the endpoints send: IMDS's
/// `{"error","error_description"}` (its codes are words: `invalid_request`,
/// `bad_request_102`), App Service's `{"statusCode","message","correlationId"}` (its status
/// repeated). `None` for any other body: a gateway's JSON with an `error` of its own (a word
/// without IMDS's description, an object, a flag) or API Management's `statusCode` and
/// `message` alone is no verdict of the endpoint's on the identity.
pub fn endpoint_error(status: u16, body: &[u8]) -> Option<String> {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let text = |field: &str| v.get(field).and_then(|d| d.as_str());
    let word = |e: &str| {
        !e.is_empty()
            && e.len() <= 64
            && e.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let imds = text("error").is_some_and(word) && text("error_description").is_some();
    let app_service = v.get("statusCode").and_then(|c| c.as_u64()) == Some(u64::from(status))
        && text("message").is_some()
        && text("correlationId").is_some();
    let description = if imds {
        text("error_description")
    } else if app_service {
        text("message")
    } else {
        return None;
    };
    Some(description.unwrap_or_default().chars().take(300).collect())
}

/// The workload identity credential with Entra's answer to a failed token request made an
/// `EntraError` of the broker's own reading (`entra::answer_to_sdk`: status, OAuth `error`,
/// codes, classified as the broker's own exchanges are), the cause of the `Credential` error
/// it returns, found again by `entra_answer`. The SDK keeps the answer (status, headers and
/// body, as `ReadableEntraErrors` passed it on) in the `HttpResponse` error under its own;
/// reading it from there, rather than from the SDK's message text or a record the transport
/// keeps per request, needs no state shared between concurrent requests and cannot pair one
/// request's answer with another's failure.
#[derive(Debug)]
struct EntraAnswers {
    inner: Arc<dyn TokenCredential>,
}

#[async_trait]
impl TokenCredential for EntraAnswers {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        self.inner.get_token(scopes, options).await.map_err(|e| {
            match answer_in(&e) {
                Some(answer) => azure_core::Error::new(ErrorKind::Credential, answer),
                // No answer (unreachable, the token file unreadable), or one the SDK could
                // not read as JSON: its own words.
                None => e,
            }
        })
    }
}

/// Entra's failed answer under the SDK's error `e`, read as the broker reads its own.
fn answer_in(e: &azure_core::Error) -> Option<EntraError> {
    causes(e).find_map(|c| {
        let ErrorKind::HttpResponse {
            status,
            raw_response: Some(r),
            ..
        } = c.downcast_ref::<azure_core::Error>()?.kind()
        else {
            return None;
        };
        let retry_after = crate::resilience::retry_after(
            |name| {
                r.headers()
                    .iter()
                    .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str().to_owned())
            },
            std::time::SystemTime::now(),
        );
        let status = u16::from(*status);
        if (300..400).contains(&status) {
            let location =
                r.headers()
                    .get_optional_str(&azure_core::http::headers::HeaderName::from_static(
                        "location",
                    ));
            return Some(EntraError::redirect(
                status,
                location,
                None,
                None,
                retry_after,
            ));
        }
        Some(crate::entra::answer_to_sdk(status, r.body(), retry_after))
    })
}

/// Entra's answer to the broker's workload identity, when `e` (a Key Vault client's error
/// from its credential) carries one (`EntraAnswers`).
pub fn entra_answer(e: &azure_core::Error) -> Option<&EntraError> {
    causes(e).find_map(|c| c.downcast_ref::<EntraError>())
}

/// `e` and every cause under it.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| c.source())
}

/// Adds `traceparent`/`tracestate` of the current span to every SDK request; for the
/// managed identity credential, wraps each request in a `managed_identity` span and records
/// it in the metrics of the flow that caused it. Its answers are read whole there (the SDK
/// reads them whole anyway), so the span and the metric cover the body too: one over its
/// bound, or broken off, is that call's failure, not a success followed by the SDK's error.
#[derive(Debug)]
struct Traced {
    inner: Arc<dyn HttpClient>,
    upstream: Option<Upstream>,
}

impl Traced {
    async fn send(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let headers = crate::telemetry::trace_headers();
        if headers.is_empty() {
            return self.inner.execute_request(request).await;
        }
        let mut traced = request.clone();
        for (k, v) in headers {
            traced.insert_header(k, v);
        }
        self.inner.execute_request(&traced).await
    }
}

#[async_trait]
impl HttpClient for Traced {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let Some(upstream) = self.upstream else {
            return self.send(request).await;
        };
        // Recorded as cut off if the fetch's retry budget ends the call.
        let metrics = crate::metrics::Metrics::current();
        let call = metrics.as_ref().map(|m| m.upstream_call(upstream));
        let span = tracing::info_span!(
            "managed_identity",
            otel.kind = "client",
            status = tracing::field::Empty
        );
        let r = async {
            let (status, headers, body) = self.send(request).await?.deconstruct();
            let body = body.collect().await?;
            Ok(AsyncRawResponse::from_bytes(status, headers, body))
        }
        .instrument(span.clone())
        .await;
        let error = match &r {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("http_{}", u16::from(resp.status()))),
            Err(e) if over_bound(e) => Some("too_large".to_owned()),
            Err(_) => Some("transport".to_owned()),
        };
        if let Ok(resp) = &r {
            span.record("status", u16::from(resp.status()));
        }
        if let Some(call) = call {
            call.end(error);
        }
        r
    }
}

/// Answers read no further than `limit` bytes, as `body_within` reads the broker's own: one
/// declaring a longer `Content-Length` fails at once, unread; any other fails once its body
/// passes the bound, so a proxy, gateway or captive portal answering in the upstream's
/// place with a huge or endless page cannot fill the broker's memory (the SDK's clients
/// collect every body whole, unbounded). The failure (`OutboundError::AnswerTooLarge`, of
/// kind `Other`, which no SDK retry policy retries) names `upstream`.
#[derive(Debug)]
struct Bounded {
    inner: Arc<dyn HttpClient>,
    limit: usize,
    upstream: &'static str,
}

impl Bounded {
    fn too_large(upstream: &'static str, limit: usize) -> azure_core::Error {
        azure_core::Error::new(
            ErrorKind::Other,
            OutboundError::AnswerTooLarge { upstream, limit },
        )
    }
}

#[async_trait]
impl HttpClient for Bounded {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = self.inner.execute_request(request).await?;
        let declared = response
            .headers()
            .get_optional_str(&azure_core::http::headers::CONTENT_LENGTH)
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limit as u64) {
            return Err(Bounded::too_large(self.upstream, self.limit));
        }
        let (status, headers, body) = response.deconstruct();
        let (limit, upstream) = (self.limit, self.upstream);
        // The bytes read so far; `None` once past the bound, which ends the stream unread.
        let bounded = body.scan(Some(0usize), move |read, chunk| {
            let Some(so_far) = *read else {
                return futures::future::ready(None);
            };
            let item = match chunk {
                Ok(chunk) if so_far + chunk.len() > limit => {
                    *read = None;
                    Err(Bounded::too_large(upstream, limit))
                }
                Ok(chunk) => {
                    *read = Some(so_far + chunk.len());
                    Ok(chunk)
                }
                Err(e) => Err(e),
            };
            futures::future::ready(Some(item))
        });
        Ok(AsyncRawResponse::new(status, headers, Box::pin(bounded)))
    }
}

/// When an upstream attempt's request was first written to a connection. The flow bounds a
/// first attempt's wait for an answer from then (`flow::attempt_bound`), not from when the
/// attempt began: getting a connection (a new one's TCP and TLS handshakes, the SDK's
/// managed identity token before a Key Vault call) takes what it takes under load, a starved
/// CPU included, and has bounds of its own, while the cut-off is for a request sent on a
/// pooled connection the network dropped silently, which is written at once. An attempt
/// runs inside `scope`; its request bodies (`watched_body`) record their first read, which
/// hyper makes once the connection is ready and the request's head is queued.
#[derive(Debug, Clone)]
pub struct WriteWatch(Arc<tokio::sync::watch::Sender<Option<tokio::time::Instant>>>);

tokio::task_local! {
    static ATTEMPT: WriteWatch;
}

impl WriteWatch {
    pub fn new() -> WriteWatch {
        WriteWatch(Arc::new(tokio::sync::watch::channel(None).0))
    }

    /// Runs `f` as the attempt this watches (the future owns its watch: an attempt given up
    /// for another may outlive its round, `flow::guarded_admitted`).
    pub fn scope<F: std::future::Future>(
        &self,
        f: F,
    ) -> tokio::task::futures::TaskLocalFuture<WriteWatch, F> {
        ATTEMPT.scope(self.clone(), f)
    }

    /// When the attempt's first request was written; pending until it is.
    pub async fn written(&self) -> tokio::time::Instant {
        let mut rx = self.0.subscribe();
        let written = rx.wait_for(Option::is_some).await.ok().and_then(|at| *at);
        match written {
            Some(at) => at,
            // The sender lives as long as `self`: not reached.
            None => std::future::pending().await,
        }
    }

    /// Records the current attempt's request as written now (after the first, and outside
    /// an attempt, nothing): for a sender that writes its requests itself.
    pub fn mark() {
        let _ = ATTEMPT.try_with(WriteWatch::record);
    }

    fn record(&self) {
        self.0.send_if_modified(|at| {
            let first = at.is_none();
            if first {
                *at = Some(tokio::time::Instant::now());
            }
            first
        });
    }
}

impl Default for WriteWatch {
    fn default() -> Self {
        WriteWatch::new()
    }
}

/// `bytes` as a request body (its length declared) that records the current attempt's
/// request as written when the connection first reads it (`WriteWatch`).
pub fn watched_body(bytes: bytes::Bytes) -> reqwest::Body {
    reqwest::Body::wrap(WatchedBody {
        bytes: Some(bytes),
        watch: ATTEMPT.try_with(WriteWatch::clone).ok(),
    })
}

struct WatchedBody {
    bytes: Option<bytes::Bytes>,
    watch: Option<WriteWatch>,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(w) = self.watch.take() {
            w.record();
        }
        std::task::Poll::Ready(self.bytes.take().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// The shared client as the Key Vault clients' transport, their request bodies watched
/// (`watched_body`) so that an attempt's bound runs from its request's write. A streamed
/// body (the SDK sends none to Key Vault) goes through the SDK's own `reqwest` transport,
/// unwatched: its attempt is bounded from its start, as before.
#[derive(Debug)]
struct Watched(reqwest::Client);

#[async_trait]
impl HttpClient for Watched {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let azure_core::http::Body::Bytes(body) = request.body() else {
            return self.0.execute_request(request).await;
        };
        let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
            .map_err(|e| azure_core::Error::new(ErrorKind::Other, e))?;
        let mut req = self.0.request(method, request.url().clone());
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        let resp = req
            .body(watched_body(body.clone()))
            .send()
            .await
            .map_err(|e| {
                // As the SDK's transport tells them: what its retry policy and ours read.
                let kind = if e.is_connect() {
                    ErrorKind::Connection
                } else {
                    ErrorKind::Io
                };
                azure_core::Error::new(kind, e)
            })?;
        let status = resp.status().as_u16().into();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                let v = v.to_str().ok()?;
                Some((
                    azure_core::http::headers::HeaderName::from(k.as_str().to_owned()),
                    azure_core::http::headers::HeaderValue::from(v.to_owned()),
                ))
            })
            .collect::<std::collections::HashMap<_, _>>();
        let body = futures::stream::try_unfold(resp, |mut resp| async move {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| azure_core::Error::new(ErrorKind::Io, e))?;
            Ok(chunk.map(|c| (c, resp)))
        });
        Ok(AsyncRawResponse::new(
            status,
            azure_core::http::headers::Headers::from(headers),
            Box::pin(body),
        ))
    }
}

/// The 401 in Key Vault's place without its bearer challenge under `e` (`RefusedTokens`).
pub fn not_key_vaults_challenge(e: &azure_core::Error) -> Option<&OutboundError> {
    causes(e).find_map(|c| {
        c.downcast_ref::<OutboundError>()
            .filter(|o| matches!(o, OutboundError::NotKeyVaultsChallenge { .. }))
    })
}

/// Whether `e` is an answer over its bound (`Bounded`), wherever it is among its causes.
pub fn over_bound(e: &azure_core::Error) -> bool {
    causes(e).any(|c| {
        matches!(
            c.downcast_ref::<OutboundError>(),
            Some(OutboundError::AnswerTooLarge { .. })
        )
    })
}

/// Sends requests for IMDS's fixed link-local address to a local emulator instead.
/// `azure_identity` offers no way to change the IMDS URL; the config only lets a loopback
/// URL take its place.
#[derive(Debug)]
struct ImdsRedirect {
    inner: reqwest::Client,
    target: Url,
}

#[async_trait]
impl HttpClient for ImdsRedirect {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        if request.url().host_str() != Some(IMDS_HOST) {
            return self.inner.execute_request(request).await;
        }
        let mut redirected = request.clone();
        let url = redirected.url_mut();
        // Scheme, host and port come from the loopback target; path and query stay.
        let _ = url.set_scheme(self.target.scheme());
        let _ = url.set_host(self.target.host_str());
        let _ = url.set_port(self.target.port_or_known_default());
        self.inner.execute_request(&redirected).await
    }
}

/// Entra's refusals made readable to `azure_identity` 1.0, whose `ClientAssertionCredential`
/// (under `WorkloadIdentityCredential`) reads `error_description` as a borrowed string: serde
/// cannot borrow a JSON string with escapes, and Entra's descriptions always have `\r\n`
/// before their trace lines, so every refusal read "invalid type: string …, expected a
/// borrowed string" instead of Entra's words and codes. The description's characters that
/// JSON escapes become plain ones; nothing else of the answer changes. A page that is not
/// JSON (a proxy's or gateway's) becomes `{}`: the SDK then fails with the answer's status,
/// which `EntraAnswers` reads, rather than with its parser's complaint. A redirect's
/// relative `Location` is made absolute against the URL asked, so that its target is named
/// as the broker's own exchanges name theirs.
#[derive(Debug)]
struct ReadableEntraErrors {
    inner: Arc<dyn HttpClient>,
}

#[async_trait]
impl HttpClient for ReadableEntraErrors {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = self.inner.execute_request(request).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let (status, mut headers, body) = response.deconstruct();
        // A redirect's Location, when relative, made absolute against the URL asked: the
        // SDK's error keeps the answer but not the request, and the target is named by it.
        if (300..400).contains(&u16::from(status))
            && let Some(target) =
                header(&headers, "location").and_then(|l| request.url().join(l).ok())
        {
            headers.insert("location", target.to_string());
        }
        let body = body.collect().await?;
        // The assertion sent (the service account's token), should a gateway answering in
        // JSON echo the form: the description reaches callers and logs.
        let sent = match request.body() {
            azure_core::http::Body::Bytes(form) => url::form_urlencoded::parse(form)
                .find(|(k, _)| k == "client_assertion")
                .map(|(_, v)| v.into_owned()),
            _ => None,
        };
        Ok(AsyncRawResponse::from_bytes(
            status,
            headers,
            without_escapes(body, sent.as_deref()),
        ))
    }
}

/// An Entra error body whose `error_description` needs no JSON escape (control characters
/// become spaces, `"` `'`, `\` `/`) and quotes no `sent` assertion; `{}` for a body that is
/// no JSON object; any other body as it is.
fn without_escapes(body: bytes::Bytes, sent: Option<&str>) -> bytes::Bytes {
    let Ok(mut v @ serde_json::Value::Object(_)) = serde_json::from_slice(&body) else {
        return bytes::Bytes::from_static(b"{}");
    };
    let Some(serde_json::Value::String(d)) = v.get_mut("error_description") else {
        return body;
    };
    if let Some(sent) = sent.filter(|a| !a.is_empty()) {
        *d = d.replace(sent, "[the assertion]");
    }
    *d = d
        .chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    serde_json::to_vec(&v).map_or(body, bytes::Bytes::from)
}

/// The body of `resp`, refused once it is longer than `limit` bytes: at once when its declared
/// length is, else as it arrives, so a peer (or a proxy) answering endlessly cannot fill the
/// broker's memory within the request's time bound.
pub async fn body_within(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, OutboundError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(OutboundError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        // The outer layers only say "error decoding response body" and repeat the URL.
        .map_err(|e| OutboundError::Body(root_cause(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(OutboundError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `message` (a transport error's), with what to check when it says a host name did not
/// resolve: the resolver's own words ("Name or service not known") do not say that a typo in
/// a vault's name, or a private endpoint's missing DNS zone, looks exactly like this.
pub fn with_dns_hint(message: String) -> String {
    let hint = if message
        .to_ascii_lowercase()
        .contains("temporary failure in name resolution")
    {
        "DNS did not answer for the host name: check the resolver"
    } else if does_not_resolve(&message) {
        "the host name does not resolve: check the configured URL's host for a typo and, behind a private endpoint, its DNS zone"
    } else {
        return message;
    };
    format!("{message} ({hint})")
}

/// Whether a transport error says its host name does not exist (not that DNS did not answer).
pub fn does_not_resolve(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    !m.contains("temporary failure in name resolution")
        && (m.contains("failed to lookup address")
            || m.contains("name or service not known")
            || m.contains("no address associated with hostname")
            || m.contains("nodename nor servname"))
}

/// The innermost cause of `e`: what the outer layers (the SDK, reqwest, hyper) only wrap
/// and repeat.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// An error with every cause under it, `outer: inner: root`: a transport error's own text
/// ("error sending request", "transport error") says nothing a person can act on; its causes
/// do ("Connection refused", "invalid peer certificate: UnknownIssuer"). A host name that
/// did not resolve also gets what to check (`with_dns_hint`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Some layers repeat their cause's text in their own.
        if !msg.ends_with(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    with_dns_hint(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload_identity() -> IdentityConfig {
        IdentityConfig {
            source: IdentitySource::WorkloadIdentity,
            client_id: None,
            imds_endpoint: None,
            cloud_authority: None,
        }
    }

    #[test]
    fn a_workload_identity_without_the_webhooks_variables_is_named_as_such_not_in_the_sdks_words() {
        let http = HttpClients {
            shared: reqwest::Client::new(),
            host: reqwest::Client::new(),
        };
        let no_env = |_: &str| None;
        let Err(e) = sdk_credential(&workload_identity(), &http, &no_env) else {
            panic!("a credential without its variables")
        };
        let m = e.to_string();
        assert!(
            m.contains("needs AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE in the broker's environment, and none is set"),
            "{m}"
        );
        assert!(m.contains("azure.workload.identity/use"), "{m}");
        assert!(!m.contains("no tenant ID specified"), "{m}");
        // As the webhook sets them: a credential.
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("azure-identity-token");
        std::fs::write(&token, "projected-token").unwrap();
        let pod = |k: &str| match k {
            "AZURE_CLIENT_ID" => Some("77777777-7777-7777-7777-777777777777".into()),
            "AZURE_TENANT_ID" => Some("88888888-8888-8888-8888-888888888888".into()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some(token.display().to_string()),
            _ => None,
        };
        sdk_credential(&workload_identity(), &http, &pod).unwrap();
        // Its authority host: AZURE_AUTHORITY_HOST from the environment given, when the
        // configuration names no cloud; never the process's own.
        let plain = |k: &str| match k {
            "AZURE_AUTHORITY_HOST" => Some("http://login.example".into()),
            _ => pod(k),
        };
        let Err(e) = sdk_credential(&workload_identity(), &http, &plain) else {
            panic!("an http authority host")
        };
        assert!(e.to_string().contains("AZURE_AUTHORITY_HOST"), "{e}");
        let configured = IdentityConfig {
            cloud_authority: Some(Url::parse("https://login.microsoftonline.us").unwrap()),
            ..workload_identity()
        };
        sdk_credential(&configured, &http, &plain).unwrap();
    }

    #[test]
    fn entras_error_description_is_rewritten_so_the_sdk_can_read_it() {
        // As Entra writes it: CRLF before the trace lines.
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS700213: No matching federated identity record found for presented assertion subject 'system:serviceaccount:a:b'. \"x\" \\ y\r\nTrace ID: t\r\nCorrelation ID: c",
            "error_codes": [700213],
        });
        let out = without_escapes(bytes::Bytes::from(body.to_string()), None);
        #[derive(serde::Deserialize)]
        struct Borrowed<'a> {
            error_description: &'a str,
            error_codes: Vec<i32>,
        }
        let read: Borrowed<'_> = serde_json::from_slice(&out).unwrap();
        assert_eq!(read.error_codes, [700213]);
        assert!(
            read.error_description.starts_with(
                "AADSTS700213: No matching federated identity record found for presented assertion subject 'system:serviceaccount:a:b'. 'x' / y  Trace ID: t"
            ),
            "{}",
            read.error_description
        );
        // Other JSON is left as it came; a page that is not a JSON object is none the SDK
        // could read (it would fail on it without the status).
        let other = "{\"error\":\"x\"}";
        assert_eq!(
            without_escapes(bytes::Bytes::from(other), None),
            bytes::Bytes::from(other)
        );
        for page in ["<html>bad gateway</html>", "", "[1]", "\"x\""] {
            assert_eq!(
                without_escapes(bytes::Bytes::from(page), None),
                bytes::Bytes::from("{}"),
                "{page}"
            );
        }
        // A gateway echoing the form: the service account's token is cut out.
        let echoed = serde_json::json!({
            "error": "invalid_request",
            "error_description": "bad form: client_assertion=eyJsa-token&client_id=c",
        });
        let out = without_escapes(bytes::Bytes::from(echoed.to_string()), Some("eyJsa-token"));
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(!out.contains("eyJ"), "{out}");
        assert!(out.contains("client_assertion=[the assertion]"), "{out}");
    }

    /// Answers every request with `status` and `body`, as Entra would.
    #[derive(Debug)]
    struct Answering(u16, &'static str);

    #[async_trait]
    impl HttpClient for Answering {
        async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
            Ok(AsyncRawResponse::from_bytes(
                azure_core::http::StatusCode::from(self.0),
                azure_core::http::headers::Headers::new(),
                bytes::Bytes::from_static(self.1.as_bytes()),
            ))
        }
    }

    /// The error of the SDK's workload identity credential, its transport and itself wrapped
    /// as the broker wraps them, when Entra answers `status` with `body` (the SDK retrying
    /// nothing).
    async fn refused_with(status: u16, body: &'static str) -> azure_core::Error {
        refused_by(Arc::new(Answering(status, body))).await
    }

    #[tokio::test]
    async fn the_projected_token_is_read_as_the_file_holds_it_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("azure-identity-token");
        let token = ProjectedToken { path: path.clone() };
        let missing = token.secret(None).await.unwrap_err().to_string();
        assert!(
            missing.contains("cannot read the workload identity's token file"),
            "{missing}"
        );
        assert!(missing.contains(&path.display().to_string()), "{missing}");
        std::fs::write(&path, "first.jwt.value\n").unwrap();
        assert_eq!(token.secret(None).await.unwrap(), "first.jwt.value");
        std::fs::write(&path, "second.jwt.value").unwrap();
        assert_eq!(token.secret(None).await.unwrap(), "second.jwt.value");
        std::fs::write(&path, " \n").unwrap();
        let empty = token.secret(None).await.unwrap_err().to_string();
        assert!(empty.contains("it is empty"), "{empty}");
        std::fs::write(&path, vec![b'a'; 65 * 1024]).unwrap();
        let large = token.secret(None).await.unwrap_err().to_string();
        assert!(large.contains("larger than 64 KiB"), "{large}");
    }

    /// The same, Entra's place taken by `answering`.
    async fn refused_by(answering: Arc<dyn HttpClient>) -> azure_core::Error {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("azure-identity-token");
        std::fs::write(&token, "projected-token").unwrap();
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = "https://login.example".into();
        let client_options = ClientOptions {
            transport: Some(Transport::new(Arc::new(ReadableEntraErrors {
                inner: answering,
            }))),
            retry: RetryOptions::none(),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        };
        let wi = crate::config::WorkloadIdentityEnv {
            client_id: "77777777-7777-7777-7777-777777777777".into(),
            tenant_id: "88888888-8888-8888-8888-888888888888".into(),
            token_file: token,
        };
        workload_identity_credential(&wi, client_options)
            .unwrap()
            .get_token(&["https://vault.azure.net/.default"], None)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_redirect_in_entras_place_to_the_workload_identity_is_named_not_followed() {
        use crate::entra::EntraErrorClass;
        for (status, class) in [
            (302, EntraErrorClass::Retryable),
            (307, EntraErrorClass::Retryable),
            (308, EntraErrorClass::Configuration),
        ] {
            let e = refused_with(status, "<html>moved</html>").await;
            let answer = entra_answer(&e).expect("Entra's answer under the error");
            assert_eq!(answer.error, "redirect", "{answer:?}");
            assert_eq!(answer.class, class, "{status}");
            assert!(
                answer
                    .to_string()
                    .contains(&format!("HTTP {status} redirect without a Location")),
                "{answer}"
            );
        }
    }

    /// Answers every request with a redirect of `status` to `location`.
    #[derive(Debug)]
    struct Redirecting(u16, &'static str);

    #[async_trait]
    impl HttpClient for Redirecting {
        async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
            let mut headers = azure_core::http::headers::Headers::new();
            headers.insert("location", self.1);
            Ok(AsyncRawResponse::from_bytes(
                azure_core::http::StatusCode::from(self.0),
                headers,
                bytes::Bytes::from_static(b"<html>moved</html>"),
            ))
        }
    }

    #[tokio::test]
    async fn a_relative_redirect_to_the_workload_identity_is_named_resolved_against_the_request() {
        let e = refused_by(Arc::new(Redirecting(308, "/elsewhere/token?code=secret#f"))).await;
        let answer = entra_answer(&e).expect("Entra's answer under the error");
        let text = answer.to_string();
        assert!(
            text.contains("HTTP 308 redirect to https://login.example/elsewhere/token,"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        // An absolute one is named as it is.
        let e = refused_by(Arc::new(Redirecting(
            302,
            "https://proxy.example/signin?x=1",
        )))
        .await;
        let text = entra_answer(&e).unwrap().to_string();
        assert!(
            text.contains("HTTP 302 redirect to https://proxy.example/signin,"),
            "{text}"
        );
    }

    /// Answers every request with 401 and `challenge` (none: no `WWW-Authenticate`).
    #[derive(Debug)]
    struct Challenging(Option<&'static str>);

    #[async_trait]
    impl HttpClient for Challenging {
        async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
            let mut headers = azure_core::http::headers::Headers::new();
            if let Some(c) = self.0 {
                headers.insert("www-authenticate", c);
            }
            headers.insert("retry-after", "9");
            Ok(AsyncRawResponse::from_bytes(
                azure_core::http::StatusCode::Unauthorized,
                headers,
                bytes::Bytes::from_static(
                    br#"{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}"#,
                ),
            ))
        }
    }

    /// A credential that is never asked (the transport alone is tested).
    #[derive(Debug)]
    struct Unused;

    #[async_trait]
    impl TokenCredential for Unused {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            unreachable!("not asked")
        }
    }

    #[tokio::test]
    async fn a_401_in_key_vaults_place_without_its_bearer_challenge_is_failed_and_named() {
        let send = |challenge: Option<&'static str>| async move {
            let transport = RefusedTokens {
                inner: Arc::new(Challenging(challenge)),
                credential: Arc::new(crate::identity::CachingCredential::new(Arc::new(Unused))),
            };
            let request = Request::new(
                Url::parse("https://v.vault.azure.net/keys/k/1/sign").unwrap(),
                azure_core::http::Method::Post,
            );
            transport.execute_request(&request).await
        };
        // Key Vault's challenge: passed on for the SDK to answer.
        let kv = r#"Bearer authorization="https://login.microsoftonline.com/t", resource="https://vault.azure.net""#;
        assert!(send(Some(kv)).await.is_ok());
        // A gateway's, none, or one naming no scheme: not Key Vault's, whatever the body says.
        for (challenge, named) in [
            (
                Some("Negotiate oRswGaADCgEA"),
                "WWW-Authenticate: Negotiate",
            ),
            (Some("NTLM, Basic realm=\"corp\""), "WWW-Authenticate: NTLM"),
            (Some("Bearer realm=\"gateway\""), "WWW-Authenticate: Bearer"),
            (None, "no WWW-Authenticate"),
            (Some("<html>"), "a WWW-Authenticate that names no scheme"),
        ] {
            let Err(e) = send(challenge).await else {
                panic!("{challenge:?} passed on")
            };
            let text = e.to_string();
            assert!(text.contains(named), "{text}");
            assert!(!text.contains("oRsw") && !text.contains("corp"), "{text}");
            let e = crate::signer::keyvault::classify_for_tests(e);
            assert!(
                matches!(&e, crate::signer::SignerError::Unavailable { retry_after, .. } if *retry_after == Some(std::time::Duration::from_secs(9))),
                "{challenge:?}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn entras_answer_to_the_workload_identity_keeps_its_status_and_oauth_error() {
        use crate::entra::EntraErrorClass;
        // An outage's page with a code the broker does not list: retried, by its status.
        let e = refused_with(
            500,
            r#"{"error":"server_error","error_description":"AADSTS50000: There was an error issuing a token.\r\nTrace ID: t\r\nCorrelation ID: c","error_codes":[50000],"correlation_id":"2f8c6b1e-0c6f-4b5a-9e3d-000000000002"}"#,
        )
        .await;
        assert!(matches!(e.kind(), ErrorKind::Credential), "{e:?}");
        let answer = entra_answer(&e).expect("Entra's answer");
        assert_eq!(
            (
                answer.status,
                answer.error.as_str(),
                answer.codes.as_slice()
            ),
            (500, "server_error", &[50000][..])
        );
        assert_eq!(answer.class, EntraErrorClass::Retryable);
        assert_eq!(
            answer.description,
            "AADSTS50000: There was an error issuing a token."
        );
        assert_eq!(
            answer.correlation_id.as_deref(),
            Some("2f8c6b1e-0c6f-4b5a-9e3d-000000000002")
        );
        // A refusal with a code not listed (newer than the list): configuration.
        let e = refused_with(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7002138: No matching federated identity record found for presented assertion subject 'system:serviceaccount:A:b'.","error_codes":[7002138]}"#,
        )
        .await;
        let answer = entra_answer(&e).expect("Entra's answer");
        assert_eq!(
            (answer.status, answer.class),
            (401, EntraErrorClass::Configuration)
        );
        assert!(e.to_string().contains("AADSTS7002138"), "{e}");
        // 400 with `temporarily_unavailable`: retried.
        let e = refused_with(
            400,
            r#"{"error":"temporarily_unavailable","error_description":"AADSTS7000999: later.","error_codes":[7000999]}"#,
        )
        .await;
        assert_eq!(
            entra_answer(&e).map(|a| a.class),
            Some(EntraErrorClass::Retryable)
        );
        // A gateway's page: named by its status (not quoted), retried.
        let e = refused_with(502, "<html>Bad Gateway: client_assertion=eyJ</html>").await;
        let answer = entra_answer(&e).expect("the answer's status");
        assert_eq!(
            (answer.status, answer.class),
            (502, EntraErrorClass::Retryable)
        );
        assert!(e.to_string().contains("without an Entra error"), "{e}");
        assert!(!e.to_string().contains("eyJ"), "{e}");
    }

    /// Answers with a body of `chunks` (their sizes; endless when `None`), declaring
    /// `length`; counts the chunks read.
    #[derive(Debug)]
    struct Streaming {
        chunks: Option<Vec<usize>>,
        length: Option<usize>,
        read: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait]
    impl HttpClient for Streaming {
        async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
            let mut headers = azure_core::http::headers::Headers::new();
            if let Some(n) = self.length {
                headers.insert(azure_core::http::headers::CONTENT_LENGTH, n.to_string());
            }
            let sizes: Box<dyn Iterator<Item = usize> + Send> = match &self.chunks {
                Some(c) => Box::new(c.clone().into_iter()),
                None => Box::new(std::iter::repeat(1024)),
            };
            let read = self.read.clone();
            let body = futures::stream::iter(sizes).map(move |n| {
                read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(bytes::Bytes::from(vec![b'x'; n]))
            });
            Ok(AsyncRawResponse::new(
                azure_core::http::StatusCode::Ok,
                headers,
                Box::pin(body),
            ))
        }
    }

    #[tokio::test]
    async fn an_sdk_answer_is_read_up_to_its_bound_and_no_further() {
        const LIMIT: usize = 4 * 1024;
        let request = Request::new(
            Url::parse("https://vault.example/keys/k/v/sign").unwrap(),
            azure_core::http::Method::Post,
        );
        // The body read through the bound (its length), the chunks read, and the failure.
        let read = |chunks: Option<Vec<usize>>, length: Option<usize>| {
            let request = request.clone();
            async move {
                let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let bounded = Bounded {
                    inner: Arc::new(Streaming {
                        chunks,
                        length,
                        read: counted.clone(),
                    }),
                    limit: LIMIT,
                    upstream: "Key Vault",
                };
                let r = match bounded.execute_request(&request).await {
                    Ok(response) => response.into_body().collect().await.map(|b| b.len()),
                    Err(e) => Err(e),
                };
                (r, counted.load(std::sync::atomic::Ordering::Relaxed))
            }
        };
        let refused = |r: azure_core::Result<usize>| {
            let e = r.expect_err("over the bound");
            assert!(over_bound(&e), "{e:?}");
            assert_eq!(
                root_cause(&e),
                "Key Vault's answer is larger than 4 KiB, more than it ever sends: a proxy or gateway may have answered"
            );
        };
        // Exactly the bound: read, declared or not.
        for length in [None, Some(LIMIT)] {
            let (r, _) = read(Some(vec![1024; 4]), length).await;
            assert_eq!(r.unwrap(), LIMIT, "{length:?}");
        }
        // One byte over, in the last chunk or in one: refused.
        for chunks in [vec![1024, 1024, 1024, 1025], vec![LIMIT + 1]] {
            let (r, _) = read(Some(chunks), None).await;
            refused(r);
        }
        // An endless body: refused once past the bound, the rest never read.
        let (r, chunks) = read(None, None).await;
        refused(r);
        assert_eq!(chunks, LIMIT / 1024 + 1);
        // A declared length over the bound: refused at once, without reading the body.
        let (r, chunks) = read(Some(vec![LIMIT + 1]), Some(LIMIT + 1)).await;
        refused(r);
        assert_eq!(chunks, 0);
    }

    #[test]
    fn a_host_name_that_does_not_resolve_is_named_with_what_to_check() {
        // What hyper's resolver says (through reqwest and azure_core) for a mistyped vault.
        let m = with_dns_hint(
            "error sending request: client error (Connect): dns error: failed to lookup address information: Name or service not known".into(),
        );
        assert!(m.contains("the host name does not resolve"), "{m}");
        assert!(m.contains("typo"), "{m}");
        let m = with_dns_hint(
            "dns error: failed to lookup address information: Temporary failure in name resolution"
                .into(),
        );
        assert!(m.contains("DNS did not answer"), "{m}");
        let refused = "tcp connect error: Connection refused (os error 111)";
        assert_eq!(
            with_dns_hint(refused.into()),
            refused,
            "no hint for other errors"
        );
    }

    #[tokio::test]
    async fn an_answer_over_its_bound_is_refused_whether_its_length_is_declared_or_not() {
        use axum::body::Body;
        use axum::routing::get;
        const LIMIT: usize = 4 * 1024;
        // Chunks of 1 KiB without a declared length, as a peer streaming endlessly sends.
        let streamed = |kib: usize| {
            Body::from_stream(futures::stream::iter(
                (0..kib).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1024]))),
            ))
        };
        let app = axum::Router::new()
            .route("/declared", get(|| async { vec![b'x'; LIMIT + 1] }))
            .route(
                "/streamed",
                get(move || async move { streamed(LIMIT / 1024 + 1) }),
            )
            .route("/fits", get(move || async move { streamed(LIMIT / 1024) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let body = |path: &'static str| {
            let (http, url) = (http.clone(), format!("{base}{path}"));
            async move { body_within(http.get(url).send().await.unwrap(), LIMIT).await }
        };
        for path in ["/declared", "/streamed"] {
            let e = body(path).await.unwrap_err();
            assert!(
                matches!(e, OutboundError::TooLarge { limit: LIMIT }),
                "{path}: {e}"
            );
            assert_eq!(e.to_string(), "the answer is larger than 4 KiB");
        }
        assert_eq!(body("/fits").await.unwrap().len(), LIMIT);
    }

    #[tokio::test]
    async fn a_watched_body_declares_its_length_and_tells_its_attempt_when_it_is_written() {
        use futures::FutureExt;
        // Echoes how the body came: its declared length, whether chunked, and the bytes.
        let app = axum::Router::new().route(
            "/echo",
            axum::routing::post(|headers: http::HeaderMap, body: bytes::Bytes| async move {
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let said = format!(
                    "{} {} {}",
                    header("content-length"),
                    header("transfer-encoding"),
                    String::from_utf8_lossy(&body)
                );
                ([("x-echo", "yes")], said)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/echo", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();

        // As the Entra exchange sends its form.
        let watch = WriteWatch::new();
        assert!(watch.written().now_or_never().is_none());
        let said = watch
            .scope(async {
                let r = http.post(&url).body(watched_body("a=1&b=2".into()));
                r.send().await.unwrap().text().await.unwrap()
            })
            .await;
        assert_eq!(said, "7 - a=1&b=2");
        assert!(watch.written().now_or_never().is_some(), "written");

        // As the Key Vault clients send theirs, through their transport.
        let watch = WriteWatch::new();
        let mut req = Request::new(Url::parse(&url).unwrap(), azure_core::http::Method::Post);
        req.insert_header("content-type", "application/json");
        req.set_body(bytes::Bytes::from_static(b"{\"alg\":\"RS256\"}"));
        let answer = watch
            .scope(Watched(http.clone()).execute_request(&req))
            .await
            .unwrap();
        assert!(watch.written().now_or_never().is_some(), "written");
        assert_eq!(
            answer.headers().get_optional_str(&"x-echo".into()),
            Some("yes")
        );
        let said = answer.into_body().collect().await.unwrap();
        assert_eq!(&said[..], b"15 - {\"alg\":\"RS256\"}");

        // Outside an attempt: sent all the same.
        let r = http.post(&url).body(watched_body("c=3".into()));
        assert_eq!(r.send().await.unwrap().text().await.unwrap(), "3 - c=3");
    }
}
