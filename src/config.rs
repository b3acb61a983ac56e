//! Broker configuration: the TOML file, environment overrides for deployment settings, and
//! validation. Owns the rule that configuration holds identifiers only, never secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use url::Url;

mod callers;
pub use callers::{
    AuditConfig, AuditOutput, CallersConfig, ClientCertMode, DEFAULT_ALGORITHMS, IssuerConfig,
    LimitsConfig, PolicyConfig, RememberConfig, secure_or_loopback,
};

/// Everything wrong with a configuration, each problem with its location.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One configuration problem: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending key (`tenants.contoso.client_id`), or `<file>` for syntax errors.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

fn format_problems(problems: &[Problem]) -> String {
    let mut out = format!("{} configuration problem(s):", problems.len());
    for p in problems {
        out.push_str("\n  - ");
        out.push_str(&p.to_string());
    }
    out
}

/// The validated configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub outbound: OutboundConfig,
    pub cloud: Cloud,
    pub cache: CacheConfig,
    pub resilience: ResilienceConfig,
    /// Tenants by their configured name.
    pub tenants: BTreeMap<String, TenantConfig>,
    pub callers: CallersConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    /// Settings that are valid but leave part of the broker unusable (no caller can
    /// authenticate, no grants, a grant that cannot be served), or soon will (a server
    /// certificate near its end): legitimate while a deployment is set up in stages, so
    /// reported, not refused.
    pub warnings: Vec<Problem>,
    /// The environment variables that overrode settings of the file (`ENV_OVERRIDES`).
    pub overrides: Vec<&'static str>,
}

/// The admin HTTP listener: `/metrics`, `/healthz`, `/readyz` (plain HTTP, no secrets).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// OpenTelemetry export: traces and metrics over OTLP (http/protobuf) when an endpoint is set.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// OTLP base URL, e.g. `http://otel-collector:4318`; none = no export.
    pub otlp_endpoint: Option<Url>,
    /// Fraction of new traces sampled (a parent's decision is followed).
    pub sampling_ratio: f64,
    pub service_name: String,
    /// How often metrics are pushed over OTLP.
    pub metrics_interval: Duration,
    /// Extra CA certificates the OTLP exporter trusts beside the platform's roots: the
    /// outbound bundle (`outbound.extra_ca_file`), so a collector behind a private CA is
    /// trusted as Key Vault and Entra behind a TLS-inspecting proxy are.
    pub extra_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Serve gRPC without TLS. Only accepted on a loopback address.
    pub plaintext: bool,
    pub tls: Option<ServerTls>,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// How often the TLS certificate, key and policy files are checked for changes.
    pub reload_interval: Duration,
    /// After this long a connection is told (HTTP/2 GOAWAY) to take new calls elsewhere; its
    /// calls in flight and watches finish on it. `None`: never.
    pub max_connection_age: Option<Duration>,
    /// HTTP/2 streams (calls and watches) one connection may have open at once; the client
    /// is told in SETTINGS, and a stream over it is refused (REFUSED_STREAM) before it costs
    /// more than its headers.
    pub max_concurrent_streams: u32,
    /// Connections served at once; past it, new ones wait (in the listen backlog, or after
    /// their TLS handshake) until one closes: the broker's file descriptors and memory stay
    /// bounded whatever its clients do.
    pub max_connections: u32,
    /// The listener's TLS as built when `tls`'s files were checked (`Config::load`), which
    /// `serve` then uses: each file is read once at start, so what was checked is what is
    /// served. `None` when the files were not read (`--files-elsewhere`).
    pub tls_loaded: Option<std::sync::Arc<crate::tls::ListenerConfig>>,
}

impl ServerConfig {
    /// Whether callers can prove themselves with a client certificate (a caller CA bundle,
    /// or a trust domain's).
    pub fn mutual_tls(&self) -> bool {
        self.tls.as_ref().is_some_and(ServerTls::verifies_clients)
    }
}

#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA bundle that signs callers' client certificates (mutual TLS). With
    /// `trust_domain_ca_files`, it vouches only for DNS names and SPIFFE IDs of trust domains
    /// not listed there.
    pub client_ca_file: Option<PathBuf>,
    /// SPIFFE trust domain name to the CA bundle that alone vouches for that domain's SPIFFE
    /// IDs (federation: each domain's certificates verified against its own bundle).
    pub trust_domain_ca_files: BTreeMap<String, PathBuf>,
    /// Certificate revocation lists (PEM) of the callers' CAs; with any, every certificate
    /// of a client's chain must be covered by one of them.
    pub client_crl_files: Vec<PathBuf>,
    pub client_cert: ClientCertMode,
}

impl ServerTls {
    /// Whether the listener asks for and verifies client certificates: it has a caller CA
    /// bundle, or a trust domain's.
    pub fn verifies_clients(&self) -> bool {
        self.client_ca_file.is_some() || !self.trust_domain_ca_files.is_empty()
    }

    /// The configuration key naming `path` as a trust domain's CA bundle, if one does.
    pub fn trust_domain_key(&self, path: &Path) -> Option<String> {
        self.trust_domain_ca_files
            .iter()
            .find(|(_, p)| p.as_path() == path)
            .map(|(domain, _)| trust_domain_key(domain))
    }
}

/// The configuration key of one trust domain's CA bundle.
fn trust_domain_key(domain: &str) -> String {
    format!("server.trust_domain_ca_files.\"{domain}\"")
}

/// The longest trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// What is wrong with a SPIFFE trust domain name, if anything: lower-case letters, digits,
/// `.`, `-` and `_` only, at most 255 bytes (the SPIFFE ID specification), so no scheme, port
/// or path.
pub fn trust_domain_problem(name: &str) -> Option<String> {
    let alone = |what: &str, bare: &str| {
        Some(format!(
            "`{name}` has {what}: name the trust domain alone, as in `{bare}`"
        ))
    };
    if name.is_empty() {
        return Some("a trust domain name cannot be empty".into());
    }
    // The SPIFFE ID specification's bound (a DNS name's).
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Some(format!(
            "`{}…` is {} bytes long: a SPIFFE trust domain name is at most {MAX_TRUST_DOMAIN_LEN}",
            name.chars().take(32).collect::<String>(),
            name.len()
        ));
    }
    let scheme = name.split_once("://").or_else(|| {
        name.split_once(':')
            .filter(|(s, _)| s.eq_ignore_ascii_case("spiffe"))
    });
    if let Some((_, rest)) = scheme {
        let rest = rest.trim_start_matches('/');
        let bare = rest.split(['/', ':']).next().unwrap_or(rest);
        return alone("a scheme", &bare.to_ascii_lowercase());
    }
    if let Some((host, _)) = name.split_once('/') {
        return alone("a path", &host.to_ascii_lowercase());
    }
    if let Some((host, _)) = name.split_once(':') {
        return alone("a port", &host.to_ascii_lowercase());
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "`{name}` has upper-case letters: SPIFFE trust domain names are lower case (`{}`)",
            name.to_ascii_lowercase()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Some(format!(
            "`{name}` has {c:?}: a SPIFFE trust domain name holds only lower-case letters, digits, `.`, `-` and `_`"
        ));
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` env-filter directive, e.g. `info,tokenbroker=debug`.
    pub level: String,
}

/// Where the broker's own managed identity token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// Let `azure_identity` pick: App Service variables, else IMDS.
    Auto,
    /// Azure Instance Metadata Service (VMs, VM scale sets, AKS node identity). The same SDK
    /// credential as `Auto`, which picks from the process's environment: a process with the
    /// App Service variables still gets App Service (`outbound::credential`; warned of,
    /// `managed_identity_pick`).
    Imds,
    /// App Service / Functions / Container Apps (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`,
    /// which the SDK reads from the process itself; the broker checks they are set).
    AppService,
    /// AKS workload identity (`AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`).
    WorkloadIdentity,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub source: IdentitySource,
    /// User-assigned identity by client id; `None` means system-assigned.
    pub client_id: Option<String>,
    /// Redirects IMDS (`169.254.169.254`) to a local emulator. Loopback only.
    pub imds_endpoint: Option<Url>,
    /// The configured cloud's authority host when the file names a cloud (`[cloud] name`):
    /// where workload identity exchanges its service account token. `None`: where
    /// `AZURE_AUTHORITY_HOST` says, else the public cloud (`workload_identity_authority`).
    pub cloud_authority: Option<Url>,
}

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Extra CA certificates trusted for outbound TLS, added to the platform roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Host names resolved to fixed addresses (for example `*.vault.azure.net` names pinned
    /// to an emulator on loopback, so Key Vault challenge verification stays on).
    pub pin_hosts: BTreeMap<String, IpAddr>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// The Entra ID cloud whose authority host the broker exchanges assertions at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cloud {
    Public,
    UsGov,
    China,
    Custom { authority_host: Url },
}

impl Cloud {
    pub fn authority_host(&self) -> Url {
        let s = match self {
            Cloud::Public => "https://login.microsoftonline.com",
            Cloud::UsGov => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
            Cloud::Custom { authority_host } => return authority_host.clone(),
        };
        Url::parse(s).unwrap_or_else(|_| unreachable!("static URL"))
    }

    /// Microsoft Graph's `/.default` scope in this cloud (unknown for a custom one): a token
    /// any app consented in a tenant gets, whatever permissions it holds, so it proves the
    /// tenant's whole path without naming one of its resources.
    pub fn graph_scope(&self) -> Option<&'static str> {
        match self {
            Cloud::Public => Some("https://graph.microsoft.com/.default"),
            Cloud::UsGov => Some("https://graph.microsoft.us/.default"),
            Cloud::China => Some("https://microsoftgraph.chinacloudapi.cn/.default"),
            Cloud::Custom { .. } => None,
        }
    }

    /// The audience of a managed identity token used as a federated credential in this cloud.
    pub fn token_exchange_audience(&self) -> &'static str {
        match self {
            Cloud::UsGov => "api://AzureADTokenExchangeUSGov",
            Cloud::China => "api://AzureADTokenExchangeChina",
            Cloud::Public | Cloud::Custom { .. } => "api://AzureADTokenExchange",
        }
    }

    /// Its `[cloud] name`.
    pub fn name(&self) -> &'static str {
        match self {
            Cloud::Public => "public",
            Cloud::UsGov => "us_gov",
            Cloud::China => "china",
            Cloud::Custom { .. } => "custom",
        }
    }

    /// The DNS suffixes of Key Vault hosts in this cloud: vaults, then Managed HSMs. None for
    /// a custom cloud, whose Key Vault (Azure Stack Hub's, an emulator's) can be anywhere.
    pub fn key_vault_suffixes(&self) -> &'static [&'static str] {
        match self {
            Cloud::Public => &["vault.azure.net", "managedhsm.azure.net"],
            Cloud::UsGov => &["vault.usgovcloudapi.net", "managedhsm.usgovcloudapi.net"],
            Cloud::China => &["vault.azure.cn", "managedhsm.azure.cn"],
            Cloud::Custom { .. } => &[],
        }
    }

    /// The Key Vault resource (audience) in this cloud.
    pub fn key_vault_resource(&self) -> &'static str {
        match self {
            Cloud::UsGov => "https://vault.usgovcloudapi.net",
            Cloud::China => "https://vault.azure.cn",
            Cloud::Public | Cloud::Custom { .. } => "https://vault.azure.net",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: u64,
    /// A token is not served once it has less than this left.
    pub safety_margin: Duration,
    /// Minimum remaining validity when the caller does not ask for one.
    pub default_min_validity: Duration,
    /// A forced refresh of one key is honoured at most once per this interval.
    pub force_refresh_interval: Duration,
    /// How often certificate metadata (thumbprints, key version) is re-read from Key Vault.
    pub certificate_refresh: Duration,
    /// Refresh ahead at this fraction of the token lifetime when Entra gives no `refresh_in`.
    pub refresh_fraction: f64,
}

impl CacheConfig {
    /// The validity owed to a caller who asks for no minimum from a token issued valid for
    /// `issued`: the default minimum validity, but at most half of `issued` (a default beyond
    /// the tokens' life would refuse every such caller, and have the key refreshed every
    /// half minute to try), and never less than the safety margin.
    pub fn default_min_validity_for(&self, issued: Duration) -> Duration {
        self.default_min_validity
            .min(issued / 2)
            .max(self.safety_margin)
    }
}

/// Half the life of Entra's shortest tokens (60 minutes): the most a caller asking for no
/// minimum validity is owed from them (`CacheConfig::default_min_validity_for`).
const HALF_SHORTEST_TOKEN: Duration = Duration::from_secs(1800);

/// Retries, budgets, breakers and pre-warming: how the broker treats its upstreams.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    /// Attempts per upstream call on transient failures (first try included).
    pub max_attempts: u32,
    /// Total time one fetch may spend retrying and waiting for budget.
    pub retry_budget: Duration,
    /// Key Vault sign calls per second per vault (below the service's 2,000 per 10 s for RSA-2048 HSM keys).
    pub sign_rate_per_vault: f64,
    pub sign_burst: u32,
    /// Entra exchanges per second per tenant.
    pub exchange_rate_per_tenant: f64,
    pub exchange_burst: u32,
    /// Consecutive transient failures that open an upstream's breaker.
    pub breaker_failures: u32,
    pub breaker_cool_down: Duration,
    /// How long a configuration failure (app not found, consent missing, certificate not
    /// registered) is answered from memory before Entra is asked again.
    pub negative_ttl: Duration,
    /// Keys fetched at start; readiness waits for them.
    pub prewarm: Vec<Prewarm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prewarm {
    pub tenant: String,
    pub scopes: Vec<String>,
}

/// How the assertion header names the certificate and which algorithm signs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SigningAlgorithm {
    RS256,
    PS256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThumbprintHeader {
    /// `x5t`: base64url SHA-1 (broadly accepted).
    X5t,
    /// `x5t#S256`: base64url SHA-256 (Microsoft's current recommendation).
    X5tS256,
    Both,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A certificate in Key Vault whose private key signs the client assertion.
    KeyVaultCertificate {
        vault_url: Url,
        certificate: String,
        algorithm: SigningAlgorithm,
        thumbprint: ThumbprintHeader,
    },
    /// A user-assigned managed identity of the broker's host, trusted by the app through a
    /// federated identity credential: its token for `audience` is the client assertion. No
    /// Key Vault is involved.
    ManagedIdentity {
        /// The identity's client id.
        client_id: String,
        /// The token-exchange audience of the app's federated credential.
        audience: String,
    },
    /// A certificate and its RSA key on a PKCS#11 token (a hardware security module): the
    /// key signs the client assertion and never leaves the token.
    Pkcs11 {
        /// The vendor's PKCS#11 library (absolute path).
        module: PathBuf,
        /// The token's label.
        token: String,
        /// The token's RFC 7512 URI (label and module), which names it in metrics and errors.
        uri: Url,
        /// The private key's label; its certificate is the object with the same CKA_ID.
        key: String,
        /// Where the token user's PIN is read from when the broker logs in.
        pin: PinSource,
        algorithm: SigningAlgorithm,
        thumbprint: ThumbprintHeader,
    },
}

/// Where a PKCS#11 token's user PIN comes from: never the configuration itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file (a mounted secret, say), read at each login; a trailing newline is ignored.
    File(PathBuf),
    /// An environment variable of the broker's process, by name.
    Env(String),
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    /// Entra tenant id (GUID) or verified domain.
    pub tenant_id: String,
    /// The app (client) id that gets tokens in this tenant.
    pub client_id: String,
    pub credential: Credential,
    /// Client capabilities declared in every token request (`claims`, as
    /// `access_token.xms_cc.values`): `cp1` opts the tenant's app in to continuous access
    /// evaluation. Empty: no `claims` parameter unless a caller passes a challenge.
    pub client_capabilities: Vec<String>,
}

// === raw file shape ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    outbound: RawOutbound,
    #[serde(default)]
    cloud: RawCloud,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    resilience: RawResilience,
    /// Shared app registrations, for one multi-tenant app used in many tenants.
    #[serde(default)]
    apps: BTreeMap<String, RawApp>,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    callers: callers::RawCallers,
    #[serde(default)]
    policy: callers::RawPolicy,
    #[serde(default)]
    audit: callers::RawAudit,
    #[serde(default)]
    limits: callers::RawLimits,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    sampling_ratio: Option<f64>,
    service_name: Option<String>,
    metrics_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    #[serde(default)]
    plaintext: bool,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    trust_domain_ca_files: BTreeMap<String, PathBuf>,
    #[serde(default)]
    client_crl_files: Vec<PathBuf>,
    client_cert: Option<ClientCertMode>,
    reload_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    max_connection_age_secs: Option<u64>,
    max_concurrent_streams: Option<u32>,
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: Option<IdentitySource>,
    client_id: Option<String>,
    imds_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    extra_ca_file: Option<PathBuf>,
    #[serde(default)]
    pin_hosts: BTreeMap<String, String>,
    connect_timeout_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    name: Option<String>,
    authority_host: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<u64>,
    safety_margin_secs: Option<u64>,
    default_min_validity_secs: Option<u64>,
    force_refresh_interval_secs: Option<u64>,
    certificate_refresh_secs: Option<u64>,
    refresh_fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResilience {
    max_attempts: Option<u32>,
    retry_budget_secs: Option<u64>,
    sign_rate_per_vault: Option<f64>,
    sign_burst: Option<u32>,
    exchange_rate_per_tenant: Option<f64>,
    exchange_burst: Option<u32>,
    breaker_failures: Option<u32>,
    breaker_cool_down_secs: Option<u64>,
    negative_ttl_secs: Option<u64>,
    #[serde(default)]
    prewarm: Vec<Prewarm>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    client_id: Option<String>,
    credential: Option<RawCredential>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    tenant_id: Option<String>,
    /// Either `client_id` + `credential` inline, or `app` naming an entry of `[apps]`.
    app: Option<String>,
    client_id: Option<String>,
    credential: Option<RawCredential>,
    /// Client capabilities to declare, e.g. `["cp1"]` for continuous access evaluation.
    client_capabilities: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    #[serde(rename = "type")]
    kind: String,
    vault_url: Option<String>,
    certificate: Option<String>,
    algorithm: Option<SigningAlgorithm>,
    thumbprint: Option<ThumbprintHeader>,
    /// `managed_identity`: the user-assigned identity's client id.
    client_id: Option<String>,
    /// `managed_identity`: the federated credential's audience (default: the cloud's).
    audience: Option<String>,
    /// `pkcs11`: the PKCS#11 library, the token's label and the key's label.
    module: Option<PathBuf>,
    token: Option<String>,
    key: Option<String>,
    /// `pkcs11`: a file holding the user PIN, or the environment variable that does.
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
}

/// Reads deployment overrides; a function so tests never touch the process environment.
pub type EnvSource<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the real process environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Only the overrides that change what the broker reports (log level and format, trace and
/// metrics export), not how it is wired: for `tokenbroker dev`, whose configuration is
/// generated and must not be changed by a stray `TOKENBROKER_LISTEN` or identity setting.
pub fn observability_env(key: &str) -> Option<String> {
    matches!(
        key,
        "TOKENBROKER_LOG_LEVEL" | "TOKENBROKER_LOG_FORMAT" | "TOKENBROKER_OTLP_ENDPOINT"
    )
    .then(|| process_env(key))
    .flatten()
}

/// What AKS workload identity takes from the pod's environment, as `serve` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentityEnv {
    /// `AZURE_TENANT_ID`: the identity's tenant.
    pub tenant_id: String,
    /// `identity.client_id`, else `AZURE_CLIENT_ID`.
    pub client_id: String,
    /// `AZURE_FEDERATED_TOKEN_FILE`: the projected service account token.
    pub token_file: PathBuf,
}

/// What the AKS workload identity webhook sets, and where; for a missing variable's fix.
const WORKLOAD_IDENTITY_WEBHOOK: &str = "the AKS workload identity webhook sets them in a pod labelled `azure.workload.identity/use: \"true\"` whose service account is annotated `azure.workload.identity/client-id: <the identity's client id>` (on a cluster with the OIDC issuer and workload identity enabled); outside AKS, set them yourself";

/// The workload identity's tenant, client id (`client_id`, the configured one, else
/// `AZURE_CLIENT_ID`) and token file from `env`, the file read as the credential will read
/// it; or what is missing or wrong, each variable by name, with what sets them. `serve` and
/// `check-config` say the same, instead of the SDK's first complaint.
pub fn workload_identity_env(
    client_id: Option<&str>,
    env: EnvSource<'_>,
) -> Result<WorkloadIdentityEnv, String> {
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let tenant_id = var("AZURE_TENANT_ID");
    let env_client_id = match client_id {
        Some(_) => None,
        None => var("AZURE_CLIENT_ID"),
    };
    let token_file = var("AZURE_FEDERATED_TOKEN_FILE");
    let mut missing = Vec::new();
    if client_id.is_none() && env_client_id.is_none() {
        missing.push("AZURE_CLIENT_ID");
    }
    if tenant_id.is_none() {
        missing.push("AZURE_TENANT_ID");
    }
    if token_file.is_none() {
        missing.push("AZURE_FEDERATED_TOKEN_FILE");
    }
    if !missing.is_empty() {
        let (needed, all) = if client_id.is_some() {
            (
                "AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE (the client id is the configured one)",
                2,
            )
        } else {
            (
                "AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE",
                3,
            )
        };
        let unset = match missing.as_slice() {
            m if m.len() == all => "none is set".to_owned(),
            [one] => format!("{one} is not set"),
            more => format!("{} are not set", more.join(" and ")),
        };
        return Err(format!(
            "workload identity needs {needed} in the broker's environment, and {unset}: {WORKLOAD_IDENTITY_WEBHOOK}"
        ));
    }
    let (tenant_id, token_file) = (
        tenant_id.unwrap_or_default(),
        token_file.unwrap_or_default(),
    );
    if let Some(why) = tenant_id_problem(&tenant_id) {
        return Err(format!("AZURE_TENANT_ID: {why}"));
    }
    let client_id = match client_id {
        Some(c) => c.to_owned(),
        None => {
            let c = env_client_id.unwrap_or_default();
            if uuid::Uuid::parse_str(&c).is_err() {
                return Err(format!(
                    "AZURE_CLIENT_ID: `{c}` is not a GUID: it is the workload identity's client id, from the service account's `azure.workload.identity/client-id` annotation"
                ));
            }
            c
        }
    };
    let token_file = PathBuf::from(token_file);
    if let Err(e) = std::fs::File::open(&token_file) {
        return Err(format!(
            "AZURE_FEDERATED_TOKEN_FILE names {}, which cannot be read ({e}): the webhook projects the service account token there; is the pod's service account the one the identity's federated credential names?",
            token_file.display()
        ));
    }
    Ok(WorkloadIdentityEnv {
        tenant_id,
        client_id,
        token_file,
    })
}

/// The variable the AKS workload identity webhook sets to the cluster's cloud's authority
/// host, and that `azure_identity` reads when given no cloud.
pub const AUTHORITY_HOST_VAR: &str = "AZURE_AUTHORITY_HOST";

/// Where workload identity exchanges its service account token: the configured cloud's
/// authority host when the file names a cloud (`configured`), so the broker's identity is in
/// the cloud of its tenants and vaults; else `AZURE_AUTHORITY_HOST` from `env`, as
/// `azure_identity` reads it (what deployments without `[cloud]` have relied on); else the
/// public cloud's. Err: the variable is used and is not an https URL.
pub fn workload_identity_authority(
    configured: Option<&Url>,
    env: EnvSource<'_>,
) -> Result<Url, String> {
    if let Some(u) = configured {
        return Ok(u.clone());
    }
    let Some(set) = env(AUTHORITY_HOST_VAR).filter(|v| !v.trim().is_empty()) else {
        return Ok(Cloud::Public.authority_host());
    };
    match Url::parse(set.trim()) {
        Ok(u) if u.scheme() == "https" && u.host().is_some() => Ok(u),
        Ok(_) => Err(format!(
            "{AUTHORITY_HOST_VAR} is `{set}`: workload identity takes its authority host from it when [cloud] names no cloud, and it must be an https URL such as https://login.microsoftonline.com/"
        )),
        Err(e) => Err(format!(
            "{AUTHORITY_HOST_VAR} is `{set}`, not a URL ({e}): workload identity takes its authority host from it when [cloud] names no cloud"
        )),
    }
}

/// The managed identity `azure_identity` 1.0's `ManagedIdentityCredential` uses, which it
/// picks from the process's variables whatever source the broker is configured with (its
/// `get_source`, followed here; a variable set empty counts as set, as it does there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedIdentityPick {
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`: the endpoint App Service, Functions and
    /// Container Apps give the process.
    AppService,
    Imds,
    /// A source the SDK names but does not support: it refuses to start with it.
    Unsupported {
        name: &'static str,
        variables: &'static str,
    },
}

/// Which managed identity the SDK takes in `env` (`ManagedIdentityPick`).
pub fn managed_identity_pick(env: EnvSource<'_>) -> ManagedIdentityPick {
    let set = |name: &str| env(name).is_some();
    let unsupported = |name, variables| ManagedIdentityPick::Unsupported { name, variables };
    if set("IDENTITY_ENDPOINT") {
        if set("IDENTITY_HEADER") {
            if set("IDENTITY_SERVER_THUMBPRINT") {
                return unsupported(
                    "Service Fabric",
                    "IDENTITY_ENDPOINT, IDENTITY_HEADER and IDENTITY_SERVER_THUMBPRINT",
                );
            }
            return ManagedIdentityPick::AppService;
        }
        if set("IMDS_ENDPOINT") {
            return unsupported("Azure Arc", "IDENTITY_ENDPOINT and IMDS_ENDPOINT");
        }
    } else if set("MSI_ENDPOINT") {
        if set("MSI_SECRET") {
            return unsupported("Azure ML", "MSI_ENDPOINT and MSI_SECRET");
        }
        return unsupported("Cloud Shell", "MSI_ENDPOINT");
    }
    ManagedIdentityPick::Imds
}

/// Whether two authority hosts are the same (scheme, host and port; the webhook's value ends
/// with a `/`, the configured ones need not).
fn same_authority(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
        && a.path().trim_end_matches('/') == b.path().trim_end_matches('/')
}

/// Seconds in an hour and in a day, for the bounds of the settings.
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;
/// Streams one HTTP/2 connection may have open at once, by default: above the calls a
/// caller makes at once within its default rate burst (100) plus its default watches (100),
/// near what HTTP/2 servers commonly allow (hyper 200, Go 250); tonic sets no limit.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// `server.max_connections` by default: many times the callers a broker serves, far below
/// the file descriptors a container is given.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// `check-config` (and `serve`'s start) warns of a server certificate that ends within this:
/// the deployment's cert-manager renews it 30 days before its end, so a warning means the
/// renewal is late, not merely due.
const CERTIFICATE_ENDS_SOON: Duration = Duration::from_secs(14 * DAY);
/// Upper bound of the token buckets' bursts (the benchmarks run with 10^9, "unlimited").
const MAX_BURST: u64 = 1_000_000_000;

/// Environment variables that override deployment settings of the file.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("TOKENBROKER_LISTEN", "server.listen"),
    ("TOKENBROKER_LOG_FORMAT", "log.format"),
    ("TOKENBROKER_LOG_LEVEL", "log.level"),
    ("TOKENBROKER_IDENTITY_SOURCE", "identity.source"),
    ("TOKENBROKER_IDENTITY_CLIENT_ID", "identity.client_id"),
    ("TOKENBROKER_EXTRA_CA_FILE", "outbound.extra_ca_file"),
    ("TOKENBROKER_ADMIN_LISTEN", "admin.listen"),
    ("TOKENBROKER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// `TOKENBROKER_*` variables read elsewhere than `ENV_OVERRIDES`: the log filter, and the
/// binary the project's own scripts run.
const OTHER_ENV: &[&str] = &["TOKENBROKER_LOG", "TOKENBROKER_BIN"];

/// `TOKENBROKER_*` variables among `names` that the broker does not read, each with the one
/// likely meant: a misspelt override (`TOKENBROKER_LISTN`) is otherwise silently ignored.
/// Warned, not refused: the environment is shared with other programs.
pub fn unknown_env_warnings(
    names: impl IntoIterator<Item = String>,
    config: &Config,
) -> Vec<Problem> {
    // Variables the configuration names itself (an HSM's `pin_env`) are read too.
    let pins = config.tenants.values().filter_map(|t| match &t.credential {
        Credential::Pkcs11 {
            pin: PinSource::Env(name),
            ..
        } => Some(name.as_str()),
        _ => None,
    });
    let known: Vec<&str> = ENV_OVERRIDES
        .iter()
        .map(|(k, _)| *k)
        .chain(OTHER_ENV.iter().copied())
        .chain(pins)
        .collect();
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("TOKENBROKER_") && !known.contains(&n.as_str()))
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|name| {
            let meant = known
                .iter()
                .map(|k| (strsim::levenshtein(k, &name), *k))
                .min()
                .filter(|(d, _)| *d <= 3)
                .map(|(_, k)| format!("; did you mean {k}?"))
                .unwrap_or_default();
            Problem {
                path: name,
                line: None,
                message: format!("not a variable tokenbroker reads, so it changes nothing{meant}"),
            }
        })
        .collect()
}

impl Config {
    /// Loads, applies environment overrides, and validates.
    pub fn load(path: &Path, env: EnvSource<'_>) -> Result<Config, ConfigError> {
        let (text, base) = read(path)?;
        Config::from_toml_str(&text, base, env)
    }

    /// `check-config --files-elsewhere`: everything but the files the configuration names
    /// (the TLS certificate and key, CA bundles, revocation lists, the policy file, the audit
    /// file's directory), which may exist only where the broker runs (mounted secrets).
    /// Returns the configuration and the files left unchecked.
    pub fn check_without_files(
        path: &Path,
        env: EnvSource<'_>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let (text, base) = read(path)?;
        let mut unchecked = Vec::new();
        let config = Config::validated(&text, base, env, Some(&mut unchecked))?;
        Ok((config, unchecked))
    }

    /// Parses and validates TOML text; relative paths resolve against `base_dir`.
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        env: EnvSource<'_>,
    ) -> Result<Config, ConfigError> {
        Config::validated(text, base_dir, env, None)
    }

    /// With `unchecked`, files are not read but listed there (`key = path`).
    fn validated(
        text: &str,
        base_dir: &Path,
        env: EnvSource<'_>,
        unchecked: Option<&mut Vec<String>>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let value: toml::Table = match text.parse() {
            Ok(v) => v,
            Err(e) => return Err(ConfigError::Invalid(vec![toml_problem(text, &e)])),
        };
        find_secrets(&toml::Value::Table(value.clone()), "", text, &mut problems);
        // The environment's overrides likewise: a problem about one quotes its value.
        for (var, _) in ENV_OVERRIDES {
            if env(var).is_some_and(|v| holds_client_secret(&v)) {
                problems.push(Problem {
                    path: (*var).to_string(),
                    line: None,
                    message: CLIENT_SECRET.into(),
                });
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let raw: RawConfig = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => return Err(ConfigError::Invalid(vec![toml_problem(text, &e)])),
        };
        let mut v = Validator {
            text,
            base_dir,
            problems,
            warnings: Vec::new(),
            issuer_names: BTreeSet::new(),
            unchecked,
            listen_from: "server.listen",
        };
        let mut config = v.validate(raw, env);
        config.warnings = std::mem::take(&mut v.warnings);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(v.problems))
        }
    }

    /// A human summary for `check-config`: what the broker will do with this file.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "listen {} ({}), cloud authority {}, identity {:?}{}\n{} tenant(s):",
            self.server.listen,
            if self.server.plaintext {
                "plaintext, loopback only"
            } else {
                "TLS"
            },
            self.cloud.authority_host(),
            self.identity.source,
            // Workload identity is always a user-assigned identity: without a client id in
            // the file, the one AKS injects (AZURE_CLIENT_ID) is used.
            match (self.identity.source, self.identity.client_id.as_deref()) {
                (IdentitySource::WorkloadIdentity, None) =>
                    " (client id from AZURE_CLIENT_ID)".into(),
                (IdentitySource::WorkloadIdentity, Some(c)) => format!(" (client id {c})"),
                (_, Some(c)) => format!(" (user-assigned {c})"),
                (_, None) => " (system-assigned)".into(),
            },
            self.tenants.len()
        );
        for t in self.tenants.values() {
            let how = match &t.credential {
                Credential::KeyVaultCertificate {
                    vault_url,
                    certificate,
                    algorithm,
                    thumbprint,
                } => format!(
                    "signs with Key Vault certificate {certificate} at {vault_url} ({algorithm:?}, {thumbprint:?})"
                ),
                Credential::ManagedIdentity {
                    client_id,
                    audience,
                } => format!(
                    "presents managed identity {client_id}'s token for {audience} (federated credential)"
                ),
                Credential::Pkcs11 {
                    uri,
                    key,
                    algorithm,
                    thumbprint,
                    ..
                } => format!("signs with key {key} on {uri} ({algorithm:?}, {thumbprint:?})"),
            };
            out.push_str(&format!(
                "\n  {}: tenant {} app {} {how}",
                t.name, t.tenant_id, t.client_id
            ));
        }
        out.push_str(&callers::summary(self));
        if !self.overrides.is_empty() {
            let applied: Vec<String> = ENV_OVERRIDES
                .iter()
                .filter(|(var, _)| self.overrides.contains(var))
                .map(|(var, key)| format!("{var} ({key})"))
                .collect();
            out.push_str(&format!(
                "\nfrom the environment, overriding the file: {}",
                applied.join(", ")
            ));
        }
        out
    }
}

/// A configuration file's text, and the directory its relative paths resolve against.
fn read(path: &Path) -> Result<(String, &Path), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok((text, path.parent().unwrap_or(Path::new("."))))
}

/// The 1-based line of `text` where a TOML error begins, when the parser says where.
pub(crate) fn toml_error_line(text: &str, e: &toml::de::Error) -> Option<usize> {
    e.span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

/// A TOML syntax or shape error: parsing stops at the first, so the message quotes the
/// offending key (or table header) and says that others may follow. Never the value: a
/// line that does not parse may hold what should not be in the file at all.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let line = toml_error_line(text, e);
    let quoted = line
        .and_then(|l| text.lines().nth(l - 1))
        .map(str::trim)
        .and_then(|l| {
            if l.starts_with('[') {
                Some(l.split(']').next().unwrap_or(l).to_owned() + "]")
            } else {
                l.split_once('=')
                    .map(|(k, _)| k.trim())
                    .filter(|k| looks_like_key(k))
                    .map(str::to_owned)
            }
        })
        .map(|k| format!(" (at `{}`)", k.chars().take(120).collect::<String>()))
        .unwrap_or_default();
    Problem {
        path: "<file>".into(),
        line,
        message: format!(
            "{}{quoted}; only the first such error is shown, fix it and check again",
            e.message().trim_end()
        ),
    }
}

/// 1-based line of the key a problem's dotted `path` names (`tenants.ab.tenant_id`,
/// `policy.grant[1].tenants`): the `key =` line or `[table]` header whose full key is the
/// longest prefix of `path`. Headers are matched segment by segment, never by substring, so
/// `[tenants.ab]` is not found at `[tenants.fabrikam]`. Best effort: `None` when not found.
pub(crate) fn line_of(text: &str, path: &str) -> Option<usize> {
    // Segments as a TOML key's: a quoted one (`trust_domain_ca_files."prod.example"`) is one.
    let target = key_segments(path);
    // How many leading segments of `target` a key covers; `None` unless it covers all of
    // the key. An array key (`prewarm = [...]`) covers an element of it (`prewarm[0]`).
    let covers = |key: &[String]| -> Option<usize> {
        (key.len() <= target.len()
            && key.iter().zip(&target).all(|(k, t)| {
                k == t
                    || t.strip_prefix(k.as_str())
                        .is_some_and(|r| r.starts_with('['))
            }))
        .then_some(key.len())
    };
    let mut header: Vec<String> = Vec::new();
    let mut arrays: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut best: Option<(usize, usize)> = None;
    let mut below: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        let key = if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let mut key = key_segments(inner);
            let n = arrays.entry(key.clone()).or_insert(0);
            if let Some(last) = key.last_mut() {
                last.push_str(&format!("[{n}]"));
            }
            *n += 1;
            header = key.clone();
            key
        } else if let Some(inner) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            header = key_segments(inner);
            header.clone()
        } else if let Some((k, _)) = t.split_once('=')
            && !t.starts_with('#')
            && looks_like_key(k)
        {
            header.iter().cloned().chain(key_segments(k)).collect()
        } else {
            continue;
        };
        if let Some(n) = covers(&key)
            && best.is_none_or(|(m, _)| n > m)
        {
            best = Some((n, i + 1));
        }
        // A table named by the path's start (`tenants`) is found at its first sub-table.
        if below.is_none() && key.len() > target.len() && covers(&key[..target.len()]).is_some() {
            below = Some(i + 1);
        }
    }
    best.map(|(_, line)| line).or(below)
}

/// The segments of a dotted TOML key (`a."b.c".d`), unquoted.
fn key_segments(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '.' => out.push(std::mem::take(&mut cur).trim().to_owned()),
            None => cur.push(c),
        }
    }
    out.push(cur.trim().to_owned());
    out
}

/// Whether the text before a `=` is a key, not part of a value on a continued line.
fn looks_like_key(k: &str) -> bool {
    let k = k.trim();
    !k.is_empty()
        && k.matches('"').count().is_multiple_of(2)
        && k.matches('\'').count().is_multiple_of(2)
        && !k.contains([',', '[', ']', '{', '}', '#'])
}

/// Words of a key (split at `_` and `-`) that mean someone is trying to give the broker a
/// secret; a phrase of several words matches them in a row. Whole words only: `secretariat`
/// or `app12` are not secrets.
const SECRET_KEY_WORDS: &[&[&str]] = &[
    &["secret"],
    &["secrets"],
    &["password"],
    &["passwd"],
    &["private", "key"],
    &["privatekey"],
    &["pfx"],
    &["pkcs12"],
    &["p12"],
    &["api", "key"],
    &["apikey"],
    &["client", "assertion"],
    &["access", "token"],
    &["refresh", "token"],
    &["connection", "string"],
];

/// Tables whose keys are names the operator chose (a tenant, an app, an issuer, a host), not
/// settings: a tenant may be called `secretariat` or `p12-retail`.
const NAME_TABLES: &[&str] = &["tenants", "apps", "callers.issuers", "outbound.pin_hosts"];

fn find_secrets(value: &toml::Value, path: &str, text: &str, problems: &mut Vec<Problem>) {
    match value {
        toml::Value::Table(t) => {
            let names = NAME_TABLES.contains(&path);
            for (k, v) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if !names && let Some(message) = secret_key(k) {
                    problems.push(Problem {
                        line: line_of(text, &p),
                        path: p.clone(),
                        message: message.into(),
                    });
                    continue;
                }
                find_secrets(v, &p, text, problems);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                find_secrets(v, &format!("{path}[{i}]"), text, problems);
            }
        }
        toml::Value::String(s) if s.contains("PRIVATE KEY-----") || looks_like_jwt(s) => {
            problems.push(Problem {
                line: line_of(text, path),
                path: path.to_string(),
                message: "holds key material or a token; tokenbroker holds no secrets, so configuration carries identifiers only".into(),
            });
        }
        toml::Value::String(s) if holds_client_secret(s) => {
            problems.push(Problem {
                line: line_of(text, path),
                path: path.to_string(),
                message: CLIENT_SECRET.into(),
            });
        }
        toml::Value::String(s) if url_with_credentials(s) => {
            problems.push(Problem {
                line: line_of(text, path),
                path: path.to_string(),
                message: CREDENTIALS_IN_URL.into(),
            });
        }
        _ => {}
    }
}

const CREDENTIALS_IN_URL: &str = "the URL carries a user name or password: credentials never go in the configuration (the broker authenticates with its managed identity); remove the `user:password@` part";

/// Whether `s` is a URL with a user name or password (`https://user:pw@host`).
fn url_with_credentials(s: &str) -> bool {
    Url::parse(s).is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
}

/// What is wrong with a setting named `key`, when its name says it holds a secret.
fn secret_key(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(['_', '-']).collect();
    if words.last() == Some(&"pin") {
        return Some(
            "a PIN is a secret and never goes in the configuration: name where the broker reads it instead (pin_file, a mounted secret, or pin_env, an environment variable)",
        );
    }
    SECRET_KEY_WORDS
        .iter()
        .any(|phrase| words.windows(phrase.len()).any(|w| w == *phrase))
        .then_some(
            "looks like a secret; tokenbroker holds no secrets: its own identity is a managed identity and client assertions are signed by Key Vault. Remove this field and configure a Key Vault certificate credential instead",
        )
}

/// Said of a value shaped like an Entra client secret, which is never repeated: the portal
/// shows it beside the client id, so it gets pasted for one.
const CLIENT_SECRET: &str = "looks like an Entra client secret (not repeated here): tokenbroker holds no secrets, its tenants' apps prove themselves with Key Vault certificates; remove it, and since it was written down, delete it from the app registration's certificates & secrets; a client id is the app's application (client) id, a GUID";

/// Whether `s` holds a value shaped like an Entra client secret as the portal makes them
/// (three characters, a digit, `Q~`, then 31 to 34 more; the shape secret scanners look
/// for), standing apart from the characters around it. No identifier, URL or path of the
/// configuration has that shape.
fn holds_client_secret(s: &str) -> bool {
    let head = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'~' | b'.');
    let tail = |b: u8| head(b) || b == b'-';
    let b = s.as_bytes();
    (4..b.len().saturating_sub(1)).any(|i| {
        if &b[i..i + 2] != b"Q~" || !b[i - 1].is_ascii_digit() {
            return false;
        }
        let start = i - 4;
        let rest = b[i + 2..].iter().take_while(|&&c| tail(c)).count();
        b[start..i - 1].iter().all(|&c| head(c))
            && (start == 0 || !head(b[start - 1]))
            && (31..=34).contains(&rest)
    })
}

fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.split('.').count() == 3 && s.len() > 40
}

struct Validator<'a> {
    text: &'a str,
    base_dir: &'a Path,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    /// The issuer names `[callers.issuers]` declares, valid or not.
    issuer_names: BTreeSet<String>,
    /// Set: files are not read here, only listed (`check-config --files-elsewhere`).
    unchecked: Option<&'a mut Vec<String>>,
    /// Where `server.listen` came from: the key, or the environment variable overriding it.
    listen_from: &'static str,
}

impl Validator<'_> {
    /// ` (from VARIABLE)` when the listen address came from the environment: a problem
    /// about it must not send the operator to a file that says something else.
    fn listen_source(&self) -> String {
        if self.listen_from == "server.listen" {
            String::new()
        } else {
            format!(" (from {})", self.listen_from)
        }
    }

    /// Whether to read the file `key` names here; when not, it is listed as unchecked.
    fn reads_files(&mut self, key: &str, path: &Path) -> bool {
        match &mut self.unchecked {
            Some(list) => {
                list.push(format!("{key} = {}", path.display()));
                false
            }
            None => true,
        }
    }

    /// A span of `raw` seconds (`default` when absent) at `path`, within `min..=max` (`why`
    /// says what the bounds protect). Every duration of the file goes through here: a zero
    /// timeout or refresh interval stops the broker, and an absurd value overflows the
    /// deadlines computed from it (or trips an assertion of the cache library) at start.
    fn span(
        &mut self,
        path: &str,
        raw: Option<u64>,
        default: u64,
        (min, max): (u64, u64),
        why: &str,
    ) -> Duration {
        Duration::from_secs(self.bounded(path, raw, default, (min, max), "seconds", why))
    }

    /// A count at `path` (`default` when absent), within `min..=max`: as `span`, refused
    /// rather than clamped, so the broker never runs with another value than the file says.
    fn count(
        &mut self,
        path: &str,
        raw: Option<u64>,
        default: u64,
        (min, max): (u64, u64),
        why: &str,
    ) -> u64 {
        self.bounded(path, raw, default, (min, max), "", why)
    }

    fn bounded(
        &mut self,
        path: &str,
        raw: Option<u64>,
        default: u64,
        (min, max): (u64, u64),
        unit: &str,
        why: &str,
    ) -> u64 {
        let value = raw.unwrap_or(default);
        if (min..=max).contains(&value) {
            return value;
        }
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        self.problem(
            path,
            format!("{value} is out of range: must be {min} to {max}{unit} ({why})"),
        );
        default
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(Problem {
            path: path.to_string(),
            line: line_of(self.text, path),
            message: message.into(),
        });
    }

    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_string(),
            line: line_of(self.text, path),
            message: message.into(),
        });
    }

    fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    fn validate(&mut self, raw: RawConfig, env: EnvSource<'_>) -> Config {
        let server = self.server(raw.server, env);
        let log = LogConfig {
            format: match env("TOKENBROKER_LOG_FORMAT") {
                Some(f) => match f.as_str() {
                    "json" => LogFormat::Json,
                    "human" => LogFormat::Human,
                    other => {
                        self.problem(
                            "TOKENBROKER_LOG_FORMAT",
                            format!("`{other}` is not a log format; use `human` or `json`"),
                        );
                        LogFormat::Human
                    }
                },
                None => raw.log.format.unwrap_or(LogFormat::Human),
            },
            level: match env("TOKENBROKER_LOG_LEVEL") {
                Some(l) => self.log_level("TOKENBROKER_LOG_LEVEL", l),
                None => match raw.log.level {
                    Some(l) => self.log_level("log.level", l),
                    None => "info".into(),
                },
            },
        };
        // The cloud first: workload identity exchanges its token at the named cloud's authority.
        let cloud_named = raw.cloud.name.is_some();
        let cloud = self.cloud(raw.cloud);
        let cloud_authority = cloud_named.then(|| cloud.authority_host());
        let identity = self.identity(raw.identity, cloud_authority, env);
        let outbound = self.outbound(raw.outbound, env);
        let cache = self.cache(raw.cache);
        let resilience = self.resilience(raw.resilience);
        let mut apps = BTreeMap::new();
        // Apps with a problem already reported: a tenant naming one is not told again that
        // no such app exists.
        let mut invalid_apps = BTreeSet::new();
        for (name, app) in raw.apps {
            let path = format!("apps.{name}");
            let client_id = self.client_id(&path, app.client_id);
            let credential = self.credential(&path, app.credential, &cloud);
            if let (Some(c), Some(cred)) = (client_id, credential) {
                apps.insert(name, (c, cred));
            } else {
                invalid_apps.insert(name);
            }
        }
        // References (pre-warm entries, grants) are checked against the names the file
        // declares: a tenant with an invalid setting is reported once, not again at every
        // place that names it.
        let declared: BTreeSet<String> = raw.tenants.keys().cloned().collect();
        // `[apps]` entries named by more than one tenant: multitenant apps.
        let mut app_uses = BTreeMap::<&str, usize>::new();
        for t in raw.tenants.values() {
            if let Some(a) = &t.app {
                *app_uses.entry(a.as_str()).or_default() += 1;
            }
        }
        let shared: BTreeSet<String> = app_uses
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(a, _)| a.to_owned())
            .collect();
        let mut tenants = BTreeMap::new();
        if raw.tenants.is_empty() {
            self.problem(
                "tenants",
                "no tenants configured; add a [tenants.NAME] table with tenant_id, client_id and a credential",
            );
        }
        for (name, t) in raw.tenants {
            let path = format!("tenants.{name}");
            if !valid_name(&name) {
                self.problem(
                    &path,
                    "tenant names use letters, digits, '-', '_' and '.' (at most 64 characters)",
                );
            }
            let tenant_id = match t.tenant_id {
                Some(id) => match tenant_id_problem(&id) {
                    None => Some(id),
                    Some(why) => {
                        self.problem(&format!("{path}.tenant_id"), why);
                        None
                    }
                },
                None => {
                    self.problem(
                        &format!("{path}.tenant_id"),
                        "missing: the Entra tenant id (GUID) or its verified domain",
                    );
                    None
                }
            };
            let client_capabilities =
                self.client_capabilities(&path, t.client_capabilities, t.app.as_deref(), &shared);
            let app = match (t.app, t.client_id, t.credential) {
                (Some(app), None, None) => match apps.get(&app) {
                    Some(a) => Some(a.clone()),
                    None if invalid_apps.contains(&app) => None,
                    None => {
                        self.problem(
                            &format!("{path}.app"),
                            format!("no [apps.{app}] is configured"),
                        );
                        None
                    }
                },
                (Some(_), _, _) => {
                    self.problem(
                        &format!("{path}.app"),
                        "give either `app` (a shared [apps] entry) or `client_id` and `credential`, not both",
                    );
                    None
                }
                (None, client_id, credential) => {
                    let c = self.client_id(&path, client_id);
                    let cred = self.credential(&path, credential, &cloud);
                    c.zip(cred)
                }
            };
            if let (Some(tenant_id), Some((client_id, credential))) = (tenant_id, app) {
                tenants.insert(
                    name.clone(),
                    TenantConfig {
                        name,
                        tenant_id,
                        client_id,
                        credential,
                        client_capabilities,
                    },
                );
            }
        }
        self.one_pin_per_token(&tenants);
        for (i, p) in resilience.prewarm.iter().enumerate() {
            if !declared.contains(&p.tenant) {
                self.problem(
                    &format!("resilience.prewarm[{i}].tenant"),
                    format!("`{}` is not a configured tenant", p.tenant),
                );
            }
        }
        let callers = self.callers(raw.callers, &server);
        let policy = self.policy(raw.policy, &declared, &server, &callers);
        if !server.mutual_tls() && callers.issuers.is_empty() && !callers.dev_loopback {
            self.warn(
                "callers",
                "no caller can authenticate, every request is refused: set server.client_ca_file or server.trust_domain_ca_files (mutual TLS) or add [callers.issuers.NAME] (bearer tokens)",
            );
        }
        let audit = self.audit(raw.audit);
        let limits = self.limits(raw.limits);
        // A warning, not a refusal: a caller may spread its watches over connections. But a
        // client that keeps them on one (as gRPC clients do) stops at the stream bound, and
        // its other calls wait behind its watches there, without end.
        if server.max_concurrent_streams <= limits.max_watches_per_caller {
            self.warn(
                "server.max_concurrent_streams",
                format!(
                    "{} is not above limits.max_watches_per_caller ({}): a caller holding its \
                     watches on one connection cannot open them all, and its other calls there \
                     wait until a watch ends; raise it above the watches plus the calls a \
                     caller makes at once",
                    server.max_concurrent_streams, limits.max_watches_per_caller
                ),
            );
        }
        let admin = self.admin(raw.admin, env);
        self.listeners_apart(&server, &admin, env);
        let mut telemetry = self.telemetry(raw.telemetry, env);
        telemetry.extra_ca_file = outbound.extra_ca_file.clone();
        Config {
            server,
            log,
            identity,
            outbound,
            cloud,
            cache,
            resilience,
            tenants,
            callers,
            policy,
            audit,
            limits,
            admin,
            telemetry,
            warnings: Vec::new(),
            overrides: ENV_OVERRIDES
                .iter()
                .filter(|(var, _)| env(var).is_some())
                .map(|(var, _)| *var)
                .collect(),
        }
    }

    /// A `tracing` filter directive as `serve` parses it, minus its trap: a bare word that is
    /// not a level is read as a target name, so `wrning` would log only errors, silently. A
    /// bare word that looks like a misspelt level is refused; other bare words are target
    /// names (`tokenbroker` logs that crate at every level), and `0` to `5` are levels.
    fn log_level(&mut self, path: &str, level: String) -> String {
        const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
        // Level names of other loggers, taken for levels here.
        const MISTAKEN: &[&str] = &["warning", "fatal", "critical", "verbose"];
        let bare_word = level.split(',').map(str::trim).find(|d| {
            let d = d.to_ascii_lowercase();
            !d.is_empty()
                && !d.contains(['=', '[', ':'])
                && !LEVELS.contains(&d.as_str())
                && LEVELS
                    .iter()
                    .chain(MISTAKEN)
                    .any(|l| d.starts_with(l) || edit_distance(&d, l) <= 2)
        });
        let why = match (
            bare_word,
            tracing_subscriber::EnvFilter::builder().parse(&level),
        ) {
            (_, Err(e)) => format!("`{level}` is not a log filter: {e}"),
            (Some(word), Ok(_)) => format!(
                "`{word}` is not a level (a bare word would be read as a target name and hide everything but errors)"
            ),
            (None, Ok(_)) => return level,
        };
        self.problem(
            path,
            format!(
                "{why}; use one of {}, or TARGET=LEVEL such as `info,tokenbroker=debug`",
                LEVELS.join(", ")
            ),
        );
        "info".into()
    }

    fn admin(&mut self, raw: RawAdmin, env: EnvSource<'_>) -> AdminConfig {
        let (path, listen) = match env("TOKENBROKER_ADMIN_LISTEN") {
            Some(l) => ("TOKENBROKER_ADMIN_LISTEN", l),
            None => (
                "admin.listen",
                raw.listen.unwrap_or_else(|| "127.0.0.1:9090".into()),
            ),
        };
        let listen = listen.parse::<SocketAddr>().unwrap_or_else(|_| {
            self.problem(
                path,
                format!("`{listen}` is not an address:port such as 0.0.0.0:9090"),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        });
        AdminConfig { listen }
    }

    /// The gRPC and admin listeners cannot share a port: the second bind would fail at start.
    fn listeners_apart(&mut self, server: &ServerConfig, admin: &AdminConfig, env: EnvSource<'_>) {
        let (s, a) = (server.listen, admin.listen);
        let overlap = s.ip() == a.ip() || s.ip().is_unspecified() || a.ip().is_unspecified();
        // Port 0 asks the system for a free port: two of them never clash.
        if s.port() == a.port() && s.port() != 0 && overlap {
            let path = if env("TOKENBROKER_ADMIN_LISTEN").is_some() {
                "TOKENBROKER_ADMIN_LISTEN"
            } else {
                "admin.listen"
            };
            self.problem(
                path,
                format!("{a} clashes with the gRPC listener {s} (server.listen): give the admin listener another port, such as {}", SocketAddr::new(a.ip(), 9090)),
            );
        }
    }

    fn telemetry(&mut self, raw: RawTelemetry, env: EnvSource<'_>) -> TelemetryConfig {
        let (path, endpoint) = match env("TOKENBROKER_OTLP_ENDPOINT") {
            Some(e) => ("TOKENBROKER_OTLP_ENDPOINT", Some(e)),
            None => ("telemetry.otlp_endpoint", raw.otlp_endpoint),
        };
        let otlp_endpoint = endpoint
            .filter(|e| !e.is_empty())
            .and_then(|e| match Url::parse(&e) {
                // From the environment: the file's values were checked by `find_secrets`.
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    self.problem(path, CREDENTIALS_IN_URL);
                    None
                }
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
                _ => {
                    self.problem(
                        path,
                        format!("`{e}` is not an http(s) URL such as http://otel-collector:4318"),
                    );
                    None
                }
            });
        let sampling_ratio = raw.sampling_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sampling_ratio) {
            self.problem(
                "telemetry.sampling_ratio",
                "must be between 0.0 (no new traces) and 1.0 (every trace)",
            );
        }
        let service_name = raw.service_name.unwrap_or_else(|| "tokenbroker".into());
        if service_name.is_empty() || service_name.len() > 128 {
            self.problem("telemetry.service_name", "must be 1 to 128 characters");
        }
        TelemetryConfig {
            otlp_endpoint,
            sampling_ratio: sampling_ratio.clamp(0.0, 1.0),
            service_name,
            metrics_interval: self.span(
                "telemetry.metrics_interval_secs",
                raw.metrics_interval_secs,
                60,
                (1, HOUR),
                "an hour: a longer gap hides an outage from the metrics backend",
            ),
            // The outbound section's, set once both are read.
            extra_ca_file: None,
        }
    }

    fn resilience(&mut self, raw: RawResilience) -> ResilienceConfig {
        // The upstream budgets run at no less than MIN_RATE: a smaller rate is refused, not
        // raised silently, so the broker runs with the rate the file says.
        let positive = |v: &mut Self, path: &str, x: f64| {
            let min = crate::limits::MIN_RATE;
            if !(x >= min && x.is_finite()) {
                v.problem(
                    path,
                    format!("must be a number of at least {min} (calls per second)"),
                );
            }
        };
        let sign_rate = raw.sign_rate_per_vault.unwrap_or(100.0);
        positive(self, "resilience.sign_rate_per_vault", sign_rate);
        let exchange_rate = raw.exchange_rate_per_tenant.unwrap_or(20.0);
        positive(self, "resilience.exchange_rate_per_tenant", exchange_rate);
        let max_attempts = self.count(
            "resilience.max_attempts",
            raw.max_attempts.map(u64::from),
            3,
            (1, 10),
            "the first try included; more only delays the answer",
        ) as u32;
        // A pre-warm key that cannot be fetched keeps the broker unready for ever.
        for (i, p) in raw.prewarm.iter().enumerate() {
            if let Some(why) = scopes_problem(&p.scopes) {
                self.problem(&format!("resilience.prewarm[{i}].scopes"), why);
            }
        }
        ResilienceConfig {
            max_attempts,
            retry_budget: self.span(
                "resilience.retry_budget_secs",
                raw.retry_budget_secs,
                10,
                (1, HOUR),
                "no fetch fits in 0; callers wait for a fetch within it",
            ),
            sign_rate_per_vault: sign_rate,
            sign_burst: self.count(
                "resilience.sign_burst",
                raw.sign_burst.map(u64::from),
                50,
                (1, MAX_BURST),
                "0 would let no sign call through",
            ) as u32,
            exchange_rate_per_tenant: exchange_rate,
            exchange_burst: self.count(
                "resilience.exchange_burst",
                raw.exchange_burst.map(u64::from),
                10,
                (1, MAX_BURST),
                "0 would let no exchange through",
            ) as u32,
            breaker_failures: self.count(
                "resilience.breaker_failures",
                raw.breaker_failures.map(u64::from),
                5,
                (1, 1000),
                "consecutive failures; 0 would open the breaker before any call",
            ) as u32,
            breaker_cool_down: self.span(
                "resilience.breaker_cool_down_secs",
                raw.breaker_cool_down_secs,
                30,
                (1, DAY),
                "an open breaker is tried again within a day",
            ),
            negative_ttl: self.span(
                "resilience.negative_ttl_secs",
                raw.negative_ttl_secs,
                30,
                (0, DAY),
                "a fixed configuration must be noticed within a day",
            ),
            prewarm: raw.prewarm,
        }
    }

    fn server(&mut self, raw: RawServer, env: EnvSource<'_>) -> ServerConfig {
        let (listen_path, listen) = match env("TOKENBROKER_LISTEN") {
            Some(l) => ("TOKENBROKER_LISTEN", l),
            None => (
                "server.listen",
                raw.listen.unwrap_or_else(|| "127.0.0.1:50051".into()),
            ),
        };
        self.listen_from = listen_path;
        let listen = match listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    listen_path,
                    format!("`{listen}` is not an address:port such as 0.0.0.0:50051"),
                );
                SocketAddr::from(([127, 0, 0, 1], 50051))
            }
        };
        let client_ca_file = raw.client_ca_file.map(|p| self.path(p));
        if let Some(p) = &client_ca_file
            && self.reads_files("server.client_ca_file", p)
            && !p.is_file()
        {
            self.problem(
                "server.client_ca_file",
                format!("{} does not exist or is not a file", p.display()),
            );
        }
        let client_crl_files: Vec<PathBuf> = raw
            .client_crl_files
            .into_iter()
            .map(|p| self.path(p))
            .collect();
        for p in &client_crl_files {
            if self.reads_files("server.client_crl_files", p) && !p.is_file() {
                self.problem(
                    "server.client_crl_files",
                    format!("{} does not exist or is not a file", p.display()),
                );
            }
        }
        let mut trust_domain_ca_files = BTreeMap::new();
        for (domain, p) in raw.trust_domain_ca_files {
            let key = trust_domain_key(&domain);
            if let Some(why) = trust_domain_problem(&domain) {
                self.problem(&key, why);
            }
            let p = self.path(p);
            if self.reads_files(&key, &p) && !p.is_file() {
                self.problem(
                    &key,
                    format!("{} does not exist or is not a file", p.display()),
                );
            }
            trust_domain_ca_files.insert(domain, p);
        }
        // Mutual TLS: a caller CA bundle, or a trust domain's.
        let client_cas = client_ca_file.is_some() || !trust_domain_ca_files.is_empty();
        if !client_crl_files.is_empty() && !client_cas {
            self.problem(
                "server.client_crl_files",
                "revocation lists apply to client certificates: set client_ca_file or trust_domain_ca_files",
            );
        }
        let client_cert = match (raw.client_cert, client_cas) {
            (Some(ClientCertMode::Required), false) => {
                self.problem(
                    "server.client_cert",
                    "client certificates cannot be required without client_ca_file or trust_domain_ca_files",
                );
                ClientCertMode::Required
            }
            (Some(m), _) => m,
            (None, _) => ClientCertMode::Optional,
        };
        let reload_interval = self.span(
            "server.reload_secs",
            raw.reload_secs,
            5,
            (1, HOUR),
            "a rotated certificate or changed policy is picked up within this",
        );
        let mut tls_loaded = None;
        let tls = match (raw.tls_cert_file, raw.tls_key_file) {
            (Some(c), Some(k)) => {
                let tls = ServerTls {
                    cert_file: self.path(c),
                    key_file: self.path(k),
                    client_ca_file: client_ca_file.clone(),
                    trust_domain_ca_files,
                    client_crl_files,
                    client_cert,
                };
                tls_loaded = self.tls_files(&tls);
                Some(tls)
            }
            (None, None) => None,
            _ => {
                self.problem(
                    "server.tls_cert_file",
                    "tls_cert_file and tls_key_file go together",
                );
                None
            }
        };
        if raw.plaintext && !listen.ip().is_loopback() {
            let from = self.listen_source();
            self.problem(
                "server.plaintext",
                format!("plaintext gRPC is allowed only on a loopback address, not {listen}{from}; configure tls_cert_file and tls_key_file"),
            );
        }
        if raw.plaintext && tls.is_some() {
            self.problem(
                "server.plaintext",
                "choose TLS (tls_cert_file, tls_key_file) or `plaintext = true`, not both",
            );
        }
        if client_cas && tls.is_none() {
            self.problem(
                if client_ca_file.is_some() {
                    "server.client_ca_file"
                } else {
                    "server.trust_domain_ca_files"
                },
                "mutual TLS needs TLS: set tls_cert_file and tls_key_file",
            );
        }
        if !raw.plaintext && tls.is_none() {
            self.problem(
                "server",
                "no TLS configured: set tls_cert_file and tls_key_file, or `plaintext = true` on a loopback address",
            );
        }
        // Long-lived HTTP/2 connections pin a caller to one replica: without an age, replicas
        // added by scaling out, or restarted in a rollout, get no traffic from existing callers.
        let max_connection_age = match raw.max_connection_age_secs {
            Some(0) => None,
            secs => Some(self.span(
                "server.max_connection_age_secs",
                secs,
                600,
                (1, 7 * DAY),
                "0 for never",
            )),
        };
        ServerConfig {
            listen,
            plaintext: raw.plaintext,
            tls,
            tls_loaded,
            shutdown_grace: self.span(
                "server.shutdown_grace_secs",
                raw.shutdown_grace_secs,
                20,
                (0, HOUR),
                "an hour: a stop must end",
            ),
            reload_interval,
            max_connection_age,
            max_concurrent_streams: self.count(
                "server.max_concurrent_streams",
                raw.max_concurrent_streams.map(u64::from),
                u64::from(DEFAULT_MAX_CONCURRENT_STREAMS),
                (1, 100_000),
                "streams one connection may have open at once",
            ) as u32,
            max_connections: self.count(
                "server.max_connections",
                raw.max_connections.map(u64::from),
                u64::from(DEFAULT_MAX_CONNECTIONS),
                (1, 1_000_000),
                "connections served at once",
            ) as u32,
        }
    }

    /// The listener's certificate, key, client CA and revocation lists exist and load, as
    /// `serve` loads them (`tls::server_config`): a missing or broken file is found here,
    /// not when the broker starts. The listener built, when the files load.
    fn tls_files(&mut self, tls: &ServerTls) -> Option<std::sync::Arc<crate::tls::ListenerConfig>> {
        let mut missing = false;
        for (key, p) in [
            ("server.tls_cert_file", &tls.cert_file),
            ("server.tls_key_file", &tls.key_file),
        ] {
            if !self.reads_files(key, p) {
                missing = true;
            } else if !p.is_file() {
                self.problem(
                    key,
                    format!("{} does not exist or is not a file", p.display()),
                );
                missing = true;
            }
        }
        let others = tls
            .client_ca_file
            .iter()
            .chain(tls.trust_domain_ca_files.values())
            .chain(&tls.client_crl_files);
        if missing || others.clone().any(|p| !p.is_file()) {
            // Reported (or listed as not checked) where they are named.
            return None;
        }
        use crate::tls::TlsError;
        let e = match crate::tls::server_config(tls) {
            Ok(listener) => {
                self.certificate_ends_soon(listener.server_cert().not_after());
                return Some(listener);
            }
            Err(e) => e,
        };
        let key = match &e {
            TlsError::Read { path, .. } | TlsError::Pem { path, .. } if *path == tls.cert_file => {
                "server.tls_cert_file".to_string()
            }
            TlsError::Read { path, .. } | TlsError::Pem { path, .. } if *path == tls.key_file => {
                "server.tls_key_file".to_string()
            }
            TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                if tls.client_crl_files.contains(path) =>
            {
                "server.client_crl_files".to_string()
            }
            TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                if tls.client_ca_file.as_ref() != Some(path)
                    && let Some(key) = tls.trust_domain_key(path) =>
            {
                key
            }
            TlsError::TrustDomainCa { domain, .. } => trust_domain_key(domain),
            TlsError::Read { .. } | TlsError::Pem { .. } | TlsError::ClientCa { .. } => {
                "server.client_ca_file".to_string()
            }
            TlsError::Crl { .. } => "server.client_crl_files".to_string(),
            TlsError::Validity { .. } => "server.tls_cert_file".to_string(),
            TlsError::Pair { .. } | TlsError::Config(_) => "server.tls_key_file".to_string(),
        };
        self.problem(&key, e.to_string());
        None
    }

    /// A warning when the server certificate (valid now: `tls::server_config` refuses it
    /// otherwise) ends within `CERTIFICATE_ENDS_SOON`: once it has, no client accepts it.
    fn certificate_ends_soon(&mut self, not_after: Option<SystemTime>) {
        let Some((not_after, left)) =
            not_after.and_then(|t| Some((t, t.duration_since(SystemTime::now()).ok()?)))
        else {
            return;
        };
        if left < CERTIFICATE_ENDS_SOON {
            let days = left.as_secs() / DAY;
            let within = match days {
                0 => "less than a day".to_string(),
                1 => "1 day".to_string(),
                n => format!("{n} days"),
            };
            self.warn(
                "server.tls_cert_file",
                format!(
                    "the certificate expires in {within} ({}): renew it; the broker picks up the renewed files without a restart",
                    crate::audit::rfc3339(not_after)
                ),
            );
        }
    }

    fn identity(
        &mut self,
        raw: RawIdentity,
        cloud_authority: Option<Url>,
        env: EnvSource<'_>,
    ) -> IdentityConfig {
        let source_key = if env("TOKENBROKER_IDENTITY_SOURCE").is_some() {
            "TOKENBROKER_IDENTITY_SOURCE"
        } else {
            "identity.source"
        };
        let source = match env("TOKENBROKER_IDENTITY_SOURCE") {
            Some(s) => match toml::Value::String(s.clone()).try_into::<IdentitySource>() {
                Ok(s) => s,
                Err(_) => {
                    self.problem(
                        "TOKENBROKER_IDENTITY_SOURCE",
                        format!("`{s}` is not one of auto, imds, app_service, workload_identity"),
                    );
                    IdentitySource::Auto
                }
            },
            None => raw.source.unwrap_or(IdentitySource::Auto),
        };
        let (id_key, client_id) = match env("TOKENBROKER_IDENTITY_CLIENT_ID") {
            Some(c) => ("TOKENBROKER_IDENTITY_CLIENT_ID", Some(c)),
            None => ("identity.client_id", raw.client_id),
        };
        if let Some(c) = &client_id
            && uuid::Uuid::parse_str(c).is_err()
        {
            self.problem(
                id_key,
                format!("`{c}` is not a GUID: give the user-assigned identity's client id"),
            );
        }
        let imds_endpoint = raw.imds_endpoint.and_then(|s| match Url::parse(&s) {
            Ok(u) if is_loopback_url(&u) => Some(u),
            Ok(_) => {
                self.problem(
                    "identity.imds_endpoint",
                    "only a loopback URL (an emulator) may replace IMDS",
                );
                None
            }
            Err(e) => {
                self.problem("identity.imds_endpoint", format!("not a URL: {e}"));
                None
            }
        });
        if source == IdentitySource::WorkloadIdentity {
            self.workload_identity(source_key, client_id.as_deref(), env);
            self.workload_identity_cloud(source_key, cloud_authority.as_ref(), env);
        } else {
            self.managed_identity_env(source_key, source, env);
        }
        IdentityConfig {
            source,
            client_id,
            imds_endpoint,
            cloud_authority,
        }
    }

    /// Where workload identity exchanges its token, as `serve` takes it: a malformed
    /// `AZURE_AUTHORITY_HOST` that would be used is a problem; one that names another
    /// authority than the one used is a warning (the identity and the tenants' exchanges
    /// would be in different clouds, or the pod's cloud is not the configured one).
    fn workload_identity_cloud(
        &mut self,
        source_key: &str,
        cloud_authority: Option<&Url>,
        env: EnvSource<'_>,
    ) {
        // Away from the pod its environment is not there to check (`--files-elsewhere`).
        if self.unchecked.is_some() {
            return;
        }
        let used = match workload_identity_authority(cloud_authority, env) {
            Ok(u) => u,
            Err(why) => {
                self.problem(source_key, why);
                return;
            }
        };
        let Some(set) = env(AUTHORITY_HOST_VAR).filter(|v| !v.trim().is_empty()) else {
            return;
        };
        let public = Cloud::Public.authority_host();
        match Url::parse(set.trim()) {
            Ok(u) if cloud_authority.is_some() && !same_authority(&u, &used) => self.warn(
                "cloud.name",
                format!(
                    "{AUTHORITY_HOST_VAR} is `{set}` (on AKS the webhook sets it from the cluster's cloud), but the configured cloud's authority is {used}: workload identity exchanges its token at {used}, as the tenants do; if the identity is in the cluster's cloud, set [cloud] to it"
                ),
            ),
            Ok(u) if cloud_authority.is_none() && !same_authority(&u, &public) => self.warn(
                "cloud",
                format!(
                    "[cloud] names no cloud, so the tenants' tokens come from the public cloud ({public}), while workload identity follows {AUTHORITY_HOST_VAR} to `{set}`: name the cloud in [cloud] (name = \"us_gov\", \"china\", or \"custom\" with its authority_host)"
                ),
            ),
            _ => {}
        }
    }

    /// The managed identity the SDK will use (`managed_identity_pick`, from the process's
    /// variables: `identity.source` does not choose it) against the configured source, as
    /// `serve` will meet it. `imds` where the process has App Service's variables is a
    /// warning, not a problem: the SDK gets the token from App Service's endpoint, the one
    /// that works where the platform sets them (IMDS is not reachable there), so refusing
    /// would stop a broker that works; the warning says the configuration does not say what
    /// is used, and how to make it. A source the SDK does not support, or `app_service`
    /// without its variables, stops `serve` at start: a problem here too.
    fn managed_identity_env(
        &mut self,
        source_key: &str,
        source: IdentitySource,
        env: EnvSource<'_>,
    ) {
        // Away from the host its environment is not there to check (`--files-elsewhere`).
        if let Some(list) = &mut self.unchecked {
            if source == IdentitySource::AppService {
                list.push(format!(
                    "{source_key} = app_service: IDENTITY_ENDPOINT, IDENTITY_HEADER (the app's environment)"
                ));
            }
            return;
        }
        match (source, managed_identity_pick(env)) {
            (_, ManagedIdentityPick::Unsupported { name, variables }) => self.problem(
                source_key,
                format!(
                    "the process has {variables} set, from which azure_identity's managed identity credential (which reads them itself, whatever identity.source says) takes {name}'s managed identity, which it does not support: the broker cannot start; unset them, or use source = \"workload_identity\""
                ),
            ),
            (IdentitySource::Imds, ManagedIdentityPick::AppService) => self.warn(
                source_key,
                "is imds, but the process has IDENTITY_ENDPOINT and IDENTITY_HEADER set, so azure_identity's managed identity credential (which reads them itself, whatever identity.source says) gets the broker's token from the App Service endpoint IDENTITY_ENDPOINT names, not from IMDS: on App Service, Functions or Container Apps, which set them, write source = \"app_service\"; elsewhere, unset them",
            ),
            (IdentitySource::AppService, ManagedIdentityPick::Imds) => self.problem(
                source_key,
                "is app_service but IDENTITY_ENDPOINT and IDENTITY_HEADER are not both set: is managed identity enabled on the app? (Elsewhere, use imds.)",
            ),
            _ => {}
        }
    }

    /// Workload identity's variables and token file are the pod's: checked here as `serve`
    /// checks them, unless the check runs elsewhere (`--files-elsewhere`), like the files.
    fn workload_identity(&mut self, source_key: &str, client_id: Option<&str>, env: EnvSource<'_>) {
        if let Some(list) = &mut self.unchecked {
            let vars = if client_id.is_some() {
                "AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE"
            } else {
                "AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE"
            };
            list.push(format!(
                "{source_key} = workload_identity: {vars} (the pod's environment and token file)"
            ));
            return;
        }
        if let Err(why) = workload_identity_env(client_id, env) {
            self.problem(
                source_key,
                format!("{why}; away from the pod, `check-config --files-elsewhere` leaves them unchecked"),
            );
        }
    }

    fn outbound(&mut self, raw: RawOutbound, env: EnvSource<'_>) -> OutboundConfig {
        let (ca_key, extra_ca_file) = match env("TOKENBROKER_EXTRA_CA_FILE") {
            Some(p) => ("TOKENBROKER_EXTRA_CA_FILE", Some(PathBuf::from(p))),
            None => ("outbound.extra_ca_file", raw.extra_ca_file),
        };
        let extra_ca_file = extra_ca_file.map(|p| self.path(p));
        let mut load_ca = false;
        if let Some(p) = &extra_ca_file
            && self.reads_files(ca_key, p)
        {
            load_ca = p.is_file();
            if !load_ca {
                self.problem(
                    ca_key,
                    format!("{} does not exist or is not a file", p.display()),
                );
            }
        }
        let mut pin_hosts = BTreeMap::new();
        for (host, ip) in raw.pin_hosts {
            match ip.parse::<IpAddr>() {
                Ok(a) => {
                    pin_hosts.insert(host.to_ascii_lowercase(), a);
                }
                Err(_) => self.problem(
                    &format!("outbound.pin_hosts.{host}"),
                    format!("`{ip}` is not an IP address"),
                ),
            }
        }
        let outbound = OutboundConfig {
            extra_ca_file,
            pin_hosts,
            connect_timeout: self.span(
                "outbound.connect_timeout_secs",
                raw.connect_timeout_secs,
                10,
                (1, 300),
                "0 would fail every connection",
            ),
            request_timeout: self.span(
                "outbound.request_timeout_secs",
                raw.request_timeout_secs,
                30,
                (1, 600),
                "0 would fail every request",
            ),
        };
        // Loaded as `serve` loads it, into the outbound client.
        if load_ca
            && let Err(e @ crate::outbound::OutboundError::CaBundle { .. }) =
                crate::outbound::http_client(&outbound)
        {
            self.problem(ca_key, e.to_string());
        }
        outbound
    }

    fn cloud(&mut self, raw: RawCloud) -> Cloud {
        match (raw.name.as_deref().unwrap_or("public"), raw.authority_host) {
            ("public", None) => Cloud::Public,
            ("us_gov", None) => Cloud::UsGov,
            ("china", None) => Cloud::China,
            ("custom", Some(h)) => match Url::parse(&h) {
                Ok(u) if u.scheme() == "https" => Cloud::Custom { authority_host: u },
                Ok(_) => {
                    self.problem("cloud.authority_host", "the authority host must use https");
                    Cloud::Public
                }
                Err(e) => {
                    self.problem("cloud.authority_host", format!("not a URL: {e}"));
                    Cloud::Public
                }
            },
            ("custom", None) => {
                self.problem(
                    "cloud.authority_host",
                    "missing: a custom cloud needs its https authority host",
                );
                Cloud::Public
            }
            (name @ ("public" | "us_gov" | "china"), Some(_)) => {
                self.problem(
                    "cloud.authority_host",
                    format!("cloud `{name}` has a fixed authority host; use name = \"custom\" to set one"),
                );
                Cloud::Public
            }
            (other, _) => {
                self.problem(
                    "cloud.name",
                    format!("`{other}` is not one of public, us_gov, china, custom"),
                );
                Cloud::Public
            }
        }
    }

    fn cache(&mut self, raw: RawCache) -> CacheConfig {
        let refresh_fraction = raw.refresh_fraction.unwrap_or(0.5);
        if !(0.1..=0.9).contains(&refresh_fraction) {
            self.problem(
                "cache.refresh_fraction",
                "must be between 0.1 and 0.9 of the token lifetime",
            );
        }
        let max_entries = self.count(
            "cache.max_entries",
            raw.max_entries,
            100_000,
            (1, 10_000_000),
            "tokens cached, a few KB each",
        );
        const TOKEN_LIFE: &str = "an hour: Entra tokens live 60 to 90 minutes";
        CacheConfig {
            max_entries,
            safety_margin: self.span(
                "cache.safety_margin_secs",
                raw.safety_margin_secs,
                60,
                (0, HOUR / 2),
                "half an hour: no token is served with less left, and Entra tokens live 60 to 90 minutes",
            ),
            default_min_validity: {
                let d = self.span(
                    "cache.default_min_validity_secs",
                    raw.default_min_validity_secs,
                    300,
                    (0, HOUR),
                    TOKEN_LIFE,
                );
                if d > HALF_SHORTEST_TOKEN {
                    self.warn(
                        "cache.default_min_validity_secs",
                        format!(
                            "{}s is more than callers asking for no minimum are owed from Entra's 60-minute tokens: at most half a token's life ({}s); ask for more with min_validity",
                            d.as_secs(),
                            HALF_SHORTEST_TOKEN.as_secs()
                        ),
                    );
                }
                d
            },
            force_refresh_interval: self.span(
                "cache.force_refresh_interval_secs",
                raw.force_refresh_interval_secs,
                30,
                (0, DAY),
                "0 honours every forced refresh",
            ),
            certificate_refresh: self.span(
                "cache.certificate_refresh_secs",
                raw.certificate_refresh_secs,
                3600,
                (60, 7 * DAY),
                "Key Vault is not asked more than once a minute, and a rotated certificate must be noticed within a week",
            ),
            refresh_fraction,
        }
    }

    /// A tenant's `client_capabilities`: each one Entra knows (`cp1`), once. Continuous
    /// access evaluation covers single-tenant apps only, so opting in with an `[apps]` entry
    /// that several tenants share (a multitenant app) is warned of.
    fn client_capabilities(
        &mut self,
        path: &str,
        raw: Option<Vec<String>>,
        app: Option<&str>,
        shared_apps: &BTreeSet<String>,
    ) -> Vec<String> {
        let key = format!("{path}.client_capabilities");
        let mut out: Vec<String> = Vec::new();
        for cap in raw.unwrap_or_default() {
            if !crate::claims::KNOWN_CAPABILITIES.contains(&cap.as_str()) {
                let known = crate::claims::KNOWN_CAPABILITIES.join("`, `");
                self.problem(
                    &key,
                    format!(
                        "`{}` is not a client capability Entra knows; use `{known}` (continuous access evaluation), or leave the key out",
                        cap.chars().take(64).collect::<String>().escape_debug()
                    ),
                );
            } else if !out.contains(&cap) {
                out.push(cap);
            }
        }
        if !out.is_empty()
            && let Some(app) = app.filter(|a| shared_apps.contains(*a))
        {
            self.warn(
                &key,
                format!(
                    "[apps.{app}] is used by several tenants, so it is a multitenant app, and continuous access evaluation covers single-tenant apps only: Entra issues it ordinary tokens"
                ),
            );
        }
        out
    }

    fn client_id(&mut self, path: &str, raw: Option<String>) -> Option<String> {
        self.guid(
            &format!("{path}.client_id"),
            raw,
            "the app registration's application (client) id",
            "",
        )
    }

    /// A GUID at `key`: `what` names it in the problem; `why` adds to a missing one.
    fn guid(&mut self, key: &str, raw: Option<String>, what: &str, why: &str) -> Option<String> {
        match raw {
            Some(c) if uuid::Uuid::parse_str(&c).is_ok() => Some(c),
            Some(c) => {
                self.problem(key, format!("`{c}` is not a GUID: give {what}"));
                None
            }
            None => {
                self.problem(key, format!("missing: {what}{why}"));
                None
            }
        }
    }

    fn credential(
        &mut self,
        path: &str,
        raw: Option<RawCredential>,
        cloud: &Cloud,
    ) -> Option<Credential> {
        let path = format!("{path}.credential");
        let Some(raw) = raw else {
            self.problem(
                &path,
                "missing: add credential = { type = \"key_vault_certificate\", vault_url = \"https://NAME.vault.azure.net\", certificate = \"NAME\" } (or { type = \"managed_identity\", client_id = \"GUID\" }, or { type = \"pkcs11\", module = \"/PATH/lib.so\", token = \"LABEL\", key = \"LABEL\", pin_file = \"/PATH\" })",
            );
            return None;
        };
        match raw.kind.as_str() {
            "key_vault_certificate" => self.key_vault_credential(&path, raw, cloud),
            "managed_identity" => self.managed_identity_credential(&path, raw, cloud),
            "pkcs11" => self.pkcs11_credential(&path, raw),
            other => {
                self.problem(
                    &format!("{path}.type"),
                    format!(
                        "`{other}` is not a supported credential; use `key_vault_certificate`, `managed_identity` or `pkcs11`"
                    ),
                );
                None
            }
        }
    }

    /// Settings of another credential type are refused rather than ignored: a half-edited
    /// credential must not look configured.
    fn not_for(&mut self, path: &str, kind: &str, fields: &[(&str, bool)]) {
        for (field, present) in fields {
            if *present {
                self.problem(
                    &format!("{path}.{field}"),
                    format!("not used by a `{kind}` credential; remove it"),
                );
            }
        }
    }

    fn managed_identity_credential(
        &mut self,
        path: &str,
        raw: RawCredential,
        cloud: &Cloud,
    ) -> Option<Credential> {
        self.not_for(
            path,
            "managed_identity",
            &[
                ("vault_url", raw.vault_url.is_some()),
                ("certificate", raw.certificate.is_some()),
                ("algorithm", raw.algorithm.is_some()),
                ("thumbprint", raw.thumbprint.is_some()),
            ],
        );
        self.not_for(path, "managed_identity", &pkcs11_fields(&raw));
        let client_id = self.guid(
            &format!("{path}.client_id"),
            raw.client_id,
            "the client id of the user-assigned managed identity the app trusts",
            " (Entra accepts only user-assigned identities as federated credentials)",
        );
        let audience = match raw.audience {
            Some(a) if !a.is_empty() && !a.chars().any(char::is_whitespace) => a,
            Some(_) => {
                self.problem(
                    &format!("{path}.audience"),
                    format!(
                        "must be the federated credential's audience, e.g. `{}`",
                        cloud.token_exchange_audience()
                    ),
                );
                return None;
            }
            None => cloud.token_exchange_audience().to_owned(),
        };
        Some(Credential::ManagedIdentity {
            client_id: client_id?,
            audience,
        })
    }

    fn key_vault_credential(
        &mut self,
        path: &str,
        raw: RawCredential,
        cloud: &Cloud,
    ) -> Option<Credential> {
        self.not_for(
            path,
            "key_vault_certificate",
            &[
                ("client_id", raw.client_id.is_some()),
                ("audience", raw.audience.is_some()),
            ],
        );
        self.not_for(path, "key_vault_certificate", &pkcs11_fields(&raw));
        let vault_url = match raw.vault_url.as_deref().map(Url::parse) {
            Some(Ok(u)) if u.scheme() == "https" && u.host_str().is_some() => {
                match vault_url_problem(&u) {
                    None => {
                        if let Some(why) = vault_host_warning(&u, cloud) {
                            self.warn(&format!("{path}.vault_url"), why);
                        }
                        Some(u)
                    }
                    Some(why) => {
                        self.problem(&format!("{path}.vault_url"), why);
                        None
                    }
                }
            }
            Some(Ok(_)) => {
                self.problem(
                    &format!("{path}.vault_url"),
                    "Key Vault is reached over https only",
                );
                None
            }
            Some(Err(e)) => {
                self.problem(&format!("{path}.vault_url"), format!("not a URL: {e}"));
                None
            }
            None => {
                self.problem(
                    &format!("{path}.vault_url"),
                    "missing: the vault URL, e.g. https://NAME.vault.azure.net",
                );
                None
            }
        };
        let certificate = match raw.certificate {
            Some(c) if valid_kv_name(&c) => Some(c),
            Some(c) => {
                self.problem(
                    &format!("{path}.certificate"),
                    format!("`{c}` is not a Key Vault object name (1-127 letters, digits and '-')"),
                );
                None
            }
            None => {
                self.problem(
                    &format!("{path}.certificate"),
                    "missing: the Key Vault certificate name",
                );
                None
            }
        };
        Some(Credential::KeyVaultCertificate {
            vault_url: vault_url?,
            certificate: certificate?,
            algorithm: raw.algorithm.unwrap_or(SigningAlgorithm::RS256),
            thumbprint: raw.thumbprint.unwrap_or(ThumbprintHeader::X5t),
        })
    }

    /// A login holds for the whole token, so every tenant on a token must log in the same
    /// way: two PIN sources for one token would make one tenant's PIN win at random.
    fn one_pin_per_token(&mut self, tenants: &BTreeMap<String, TenantConfig>) {
        let mut first: BTreeMap<&Url, (&str, &PinSource)> = BTreeMap::new();
        for t in tenants.values() {
            if let Credential::Pkcs11 { uri, pin, .. } = &t.credential {
                match first.get(uri) {
                    Some((other, p)) if *p != pin => self.problem(
                        &format!("tenants.{}.credential", t.name),
                        format!(
                            "names token `{uri}` with another pin_file or pin_env than tenant `{other}`: a token has one user PIN, give both the same"
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        first.insert(uri, (&t.name, pin));
                    }
                }
            }
        }
    }

    fn pkcs11_credential(&mut self, path: &str, raw: RawCredential) -> Option<Credential> {
        self.not_for(
            path,
            "pkcs11",
            &[
                ("vault_url", raw.vault_url.is_some()),
                ("certificate", raw.certificate.is_some()),
                ("client_id", raw.client_id.is_some()),
                ("audience", raw.audience.is_some()),
            ],
        );
        let module = match raw.module {
            Some(m) if m.is_absolute() => Some(m),
            Some(m) => {
                self.problem(
                    &format!("{path}.module"),
                    format!(
                        "`{}` is relative: give the PKCS#11 library's absolute path, so the library loaded does not depend on the working directory",
                        m.display()
                    ),
                );
                None
            }
            None => {
                self.problem(
                    &format!("{path}.module"),
                    "missing: the vendor's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so",
                );
                None
            }
        };
        let mut label = |field: &str, value: Option<String>, what: &str| match value {
            // PKCS#11 labels are at most 32 bytes (token) and free text (objects).
            Some(v) if !v.is_empty() && (field != "token" || v.len() <= 32) => Some(v),
            Some(_) => {
                self.problem(
                    &format!("{path}.{field}"),
                    format!("must be {what} (a token label is 1 to 32 bytes)"),
                );
                None
            }
            None => {
                self.problem(&format!("{path}.{field}"), format!("missing: {what}"));
                None
            }
        };
        let token = label("token", raw.token, "the token's label");
        let key = label("key", raw.key, "the private key's label (CKA_LABEL)");
        let pin = match (raw.pin_file, raw.pin_env) {
            (Some(f), None) if f.is_absolute() => Some(PinSource::File(f)),
            (Some(f), None) => {
                self.problem(
                    &format!("{path}.pin_file"),
                    format!("`{}` is relative: give an absolute path", f.display()),
                );
                None
            }
            (None, Some(e)) if valid_env_name(&e) => Some(PinSource::Env(e)),
            (None, Some(e)) => {
                self.problem(
                    &format!("{path}.pin_env"),
                    format!("`{e}` is not an environment variable name (letters, digits and '_'): name the variable that holds the PIN, not the PIN"),
                );
                None
            }
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{path}.pin_file"),
                    "give pin_file or pin_env, not both",
                );
                None
            }
            (None, None) => {
                self.problem(
                    &format!("{path}.pin_file"),
                    "missing: the file (or, with pin_env, the environment variable) that holds the token user's PIN; the PIN itself never goes in the configuration",
                );
                None
            }
        };
        let (module, token) = (module?, token?);
        let uri = match crate::signer::pkcs11::token_url(&module, &token) {
            Ok(u) => u,
            Err(e) => {
                self.problem(
                    &format!("{path}.token"),
                    format!("cannot name it in a pkcs11: URI: {e}"),
                );
                return None;
            }
        };
        Some(Credential::Pkcs11 {
            module,
            token,
            uri,
            key: key?,
            pin: pin?,
            algorithm: raw.algorithm.unwrap_or(SigningAlgorithm::RS256),
            thumbprint: raw.thumbprint.unwrap_or(ThumbprintHeader::X5t),
        })
    }
}

/// What is wrong with a Key Vault URL beyond its scheme: it names the vault only (the
/// certificate is named by `certificate`), with no path, query, fragment or credentials.
fn vault_url_problem(u: &Url) -> Option<String> {
    if !u.username().is_empty() || u.password().is_some() {
        return Some(CREDENTIALS_IN_URL.into());
    }
    let host = u.host_str().unwrap_or("NAME.vault.azure.net");
    let base = match u.port() {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    };
    let segments: Vec<&str> = u
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if let ["certificates" | "keys" | "secrets", name, ..] = segments.as_slice() {
        return Some(format!(
            "is a certificate's URL, not the vault's: use vault_url = \"{base}\" and certificate = \"{name}\""
        ));
    }
    if !segments.is_empty() {
        return Some(format!(
            "names the vault only, without a path: use vault_url = \"{base}\""
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Some(format!(
            "names the vault only, without a query or fragment: use vault_url = \"{base}\""
        ));
    }
    None
}

/// Why a vault URL's host may not be a Key Vault of `cloud`: it does not end with the cloud's
/// Key Vault DNS suffix (a vault's, or a Managed HSM's). A warning, not a refusal: a service
/// of its own that speaks Key Vault's protocol (an emulator) can be anywhere. Loopback hosts
/// (the emulator's) and custom clouds (their suffix is not known here) are not judged.
fn vault_host_warning(u: &Url, cloud: &Cloud) -> Option<String> {
    let suffixes = cloud.key_vault_suffixes();
    let host = u.host_str()?;
    if suffixes.is_empty() || is_loopback_url(u) {
        return None;
    }
    let in_cloud = |c: &Cloud| {
        c.key_vault_suffixes().iter().any(|s| {
            host.strip_suffix(s)
                .is_some_and(|n| n.len() > 1 && n.ends_with('.'))
        })
    };
    if in_cloud(cloud) {
        return None;
    }
    let expected = format!(
        "`NAME.{}` (`NAME.{}` for a Managed HSM)",
        suffixes[0], suffixes[1]
    );
    let cloud_name = cloud.name();
    let other = [Cloud::Public, Cloud::UsGov, Cloud::China]
        .into_iter()
        .find(|c| c != cloud && in_cloud(c));
    Some(match other {
        Some(other) => format!(
            "`{host}` is a Key Vault host of the `{}` cloud, but [cloud] name is `{cloud_name}`, whose vaults are {expected}: the broker's identity and its Entra exchanges are in `{cloud_name}`; use a vault of that cloud, or set [cloud] name = \"{}\"",
            other.name(),
            other.name()
        ),
        None => format!(
            "`{host}` is not a Key Vault host of the `{cloud_name}` cloud, whose vaults are {expected}: Key Vault's sign-in challenge names that suffix, and the broker accepts a challenge only for a host under it, so signing fails unless this host is a Key Vault-compatible service of its own (an emulator); check the URL (behind a private endpoint, keep the vault's own name: its DNS zone resolves it to the private address)"
        ),
    })
}

/// What is wrong with asking for `scopes` in one request: first what the broker itself
/// refuses in a request (`broker::normalise_scopes`), then what Entra refuses with client
/// credentials (`client_credentials_scope_problem`).
pub fn scopes_problem(scopes: &[String]) -> Option<String> {
    if let Err(e) = crate::broker::normalise_scopes(scopes) {
        return Some(match e {
            crate::broker::BrokerError::InvalidArgument { message, .. } => message,
            other => other.to_string(),
        });
    }
    scopes
        .iter()
        .find_map(|s| client_credentials_scope_problem(s.trim()))
}

/// Why Entra refuses `scope` in a client-credentials request, if it does: only a resource's
/// `/.default` scope is accepted there (AADSTS1002012), not a permission (`User.Read`) or
/// a bare resource name.
pub fn client_credentials_scope_problem(scope: &str) -> Option<String> {
    if scope
        .strip_suffix("/.default")
        .is_some_and(|resource| !resource.is_empty())
    {
        return None;
    }
    // The resource of a scope such as https://graph.microsoft.com/User.Read.
    let suggestion = scope
        .split_once("://")
        .and_then(|(scheme, rest)| {
            let host = rest.split('/').next().filter(|h| !h.is_empty())?;
            Some(format!("{scheme}://{host}/.default"))
        })
        .unwrap_or_else(|| "https://graph.microsoft.com/.default".into());
    Some(format!(
        "`{scope}` cannot be asked for with client credentials, which take only a resource's `/.default` scope (Entra refuses anything else, AADSTS1002012): use `{suggestion}`"
    ))
}

fn pkcs11_fields(raw: &RawCredential) -> [(&'static str, bool); 5] {
    [
        ("module", raw.module.is_some()),
        ("token", raw.token.is_some()),
        ("key", raw.key.is_some()),
        ("pin_file", raw.pin_file.is_some()),
        ("pin_env", raw.pin_env.is_some()),
    ]
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_kv_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 127 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Levenshtein distance between two short ASCII words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A GUID or a DNS domain: what Entra accepts in the token endpoint path.
pub fn valid_tenant_id(s: &str) -> bool {
    tenant_id_problem(s).is_none()
}

/// Why `s` cannot name a tenant in the token endpoint's path (`/{tenant}/oauth2/v2.0/token`),
/// if it cannot: it must be a hyphenated GUID or a DNS domain name (labels of 1 to 63
/// letters, digits and '-', not starting or ending with '-', at least two labels). Anything
/// looser reaches the URL: `..` would make the path `/../oauth2/v2.0/token`.
pub fn tenant_id_problem(s: &str) -> Option<String> {
    const EXPECTED: &str = "a tenant id is its GUID (8-4-4-4-12 hex digits) or a verified domain such as contoso.onmicrosoft.com";
    let lower = s.to_ascii_lowercase();
    if matches!(lower.as_str(), "common" | "organizations" | "consumers") {
        return Some(format!(
            "`{s}` names no tenant: client credentials need a specific tenant; {EXPECTED}"
        ));
    }
    if s.len() == 36 && uuid::Uuid::try_parse(s).is_ok() {
        return None;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let domain = s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(label_ok)
        // The last label is a top-level domain, never all digits (that is an IP address).
        && labels
            .last()
            .is_some_and(|t| t.chars().any(|c| c.is_ascii_alphabetic()));
    if domain {
        None
    } else {
        Some(format!("`{s}` is not an Entra tenant id: {EXPECTED}"))
    }
}

fn is_loopback_url(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

#[cfg(test)]
mod tests;
