//! Runtime state shared by all listeners: vault contents (certificate versions and their keys),
//! tenants and app registrations (registered keys, enabled flag), the assertion replay cache,
//! and request counters. Built once from the config at start; `POST /reset` restores the
//! initial snapshot (same keys and thumbprints, so clients' caches stay coherent).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use rsa::RsaPublicKey;
use serde::Serialize;
use tokio::sync::watch;

use super::Endpoints;
use super::clock::EmuClock;
use super::config::{
    EmulatorConfig, FederatedCredentialConfig, IdentityConfig, RoleAssignmentConfig, VaultRole,
};
use super::error::EmulatorError;
use super::faults::Faults;
use super::issuers::ExternalIssuers;
use super::keys::{self, CertVersion, IssuerKey};

/// Everything the request handlers need, behind one `Arc`.
pub(crate) struct Shared {
    pub endpoints: Endpoints,
    pub identities: Vec<IdentityConfig>,
    pub issuer: IssuerKey,
    /// Keys of external issuers named by federated credentials, fetched on use.
    pub issuers: ExternalIssuers,
    state: Mutex<State>,
    initial: State,
    pub faults: Faults,
    /// The emulator's clock (real time plus the offset set by `POST /clock/advance`).
    pub clock: EmuClock,
    counters: Mutex<Counters>,
    /// Flips to `true` on shutdown so that hanging requests end.
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Clone)]
pub(crate) struct State {
    pub vaults: Vec<Vault>,
    pub tenants: Vec<Tenant>,
    /// `client_id|jti` -> expiry of the assertion that used it (strict assertions only).
    pub seen_jti: HashMap<String, i64>,
    /// `entra.strict_assertions` of the configuration.
    pub strict_assertions: bool,
    /// Managed-identity tokens handed out, by (identity name, resource): IMDS answers with
    /// the same token until it expires.
    pub mi_tokens: HashMap<(String, String), IssuedMiToken>,
}

/// A managed-identity token as issued.
#[derive(Clone)]
pub(crate) struct IssuedMiToken {
    pub access_token: String,
    pub not_before: i64,
    pub expires_on: i64,
}

#[derive(Clone)]
pub(crate) struct Vault {
    pub name: String,
    pub tenant_id: String,
    pub certs: Vec<Cert>,
    pub roles: Vec<RoleAssignmentConfig>,
}

#[derive(Clone)]
pub(crate) struct Cert {
    pub name: String,
    /// Oldest first; the last one is current.
    pub versions: Vec<CertVersion>,
    pub key_size: usize,
    pub subject_cn: String,
    pub validity_days: u32,
    pub content_type: String,
}

impl Cert {
    pub fn current(&self) -> Option<&CertVersion> {
        self.versions.last()
    }
    pub fn version(&self, version: Option<&str>) -> Option<&CertVersion> {
        match version {
            None | Some("") => self.current(),
            Some(v) => self
                .versions
                .iter()
                .find(|c| c.version.eq_ignore_ascii_case(v)),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Tenant {
    pub tenant_id: String,
    pub domain: Option<String>,
    pub resources: Vec<String>,
    pub apis: Vec<super::config::ApiConfig>,
    pub apps: Vec<App>,
    /// Size of the tenant's Graph-style sign-in log.
    pub graph_records: u32,
}

#[derive(Clone)]
pub(crate) struct App {
    pub client_id: String,
    pub display_name: String,
    pub cert_refs: Vec<String>,
    pub keys: Vec<RegisteredKey>,
    pub roles: Vec<String>,
    pub enabled: bool,
    pub lifetime: [u64; 2],
    /// For tokens asked for with the `cp1` client capability; else `lifetime`.
    pub cae_lifetime: Option<[u64; 2]>,
    pub sp_id: String,
    /// Federated credentials of the app registration (union over all tenants listing it).
    pub fics: Vec<FederatedCredentialConfig>,
}

/// A certificate credential registered on an app (what Entra keeps: the public key and thumbprints).
#[derive(Clone)]
pub(crate) struct RegisteredKey {
    pub x5t: String,
    pub x5t_s256: String,
    pub public: RsaPublicKey,
    /// The key credential's validity (Unix seconds): the certificate's, as the portal and
    /// `az ad app credential reset --cert` register it.
    pub start: i64,
    pub end: i64,
}

impl RegisteredKey {
    fn of(v: &CertVersion) -> Self {
        Self {
            x5t: v.x5t.clone(),
            x5t_s256: v.x5t_s256.clone(),
            public: v.public.clone(),
            start: v.not_before,
            end: v.expires,
        }
    }
}

/// Key Vault operations subject to RBAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaultOp {
    Sign,
    ReadKey,
    ReadCert,
    ImportCert,
}

impl VaultOp {
    pub fn data_action(self) -> &'static str {
        match self {
            Self::Sign => "Microsoft.KeyVault/vaults/keys/sign/action",
            Self::ReadKey => "Microsoft.KeyVault/vaults/keys/read",
            Self::ReadCert => "Microsoft.KeyVault/vaults/certificates/read",
            Self::ImportCert => "Microsoft.KeyVault/vaults/certificates/import/action",
        }
    }
    fn granted_by(self, role: VaultRole) -> bool {
        use VaultRole::*;
        match self {
            Self::Sign => matches!(role, CryptoUser | CryptoOfficer | Administrator),
            Self::ReadKey => matches!(
                role,
                CryptoUser | CryptoOfficer | CertificateUser | Reader | Administrator
            ),
            Self::ReadCert => matches!(
                role,
                CertificateUser | CertificatesOfficer | Reader | Administrator
            ),
            Self::ImportCert => matches!(role, CertificatesOfficer | Administrator),
        }
    }
    fn collection(self) -> &'static str {
        match self {
            Self::Sign | Self::ReadKey => "keys",
            Self::ReadCert | Self::ImportCert => "certificates",
        }
    }
}

impl Vault {
    /// Whether `oid` holds a role granting `op` on the object `name` (or on the vault, when
    /// `name` is `None`, e.g. for listing).
    pub fn allows(&self, oid: &str, op: VaultOp, name: Option<&str>) -> bool {
        self.roles.iter().any(|r| {
            r.principal.eq_ignore_ascii_case(oid)
                && op.granted_by(r.role)
                && (r.scope == "*"
                    || match (name, r.scope.split_once('/')) {
                        (Some(n), Some((coll, obj))) => {
                            coll == op.collection() && obj.eq_ignore_ascii_case(n)
                        }
                        _ => false,
                    })
        })
    }

    pub fn cert(&self, name: &str) -> Option<&Cert> {
        self.certs
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }
}

impl State {
    /// The vault a request addressed to `host` (the Host header) means: `{name}.vault.azure.net`
    /// by name, anything else (loopback) the first vault.
    pub fn vault_for_host(&self, host: &str) -> Option<usize> {
        let hostname = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        match hostname
            .to_ascii_lowercase()
            .strip_suffix(".vault.azure.net")
        {
            Some(name) => self
                .vaults
                .iter()
                .position(|v| v.name.eq_ignore_ascii_case(name)),
            None if self.vaults.is_empty() => None,
            None => Some(0),
        }
    }

    pub fn vault_by_name(&self, name: &str) -> Option<usize> {
        self.vaults
            .iter()
            .position(|v| v.name.eq_ignore_ascii_case(name))
    }

    /// A tenant by id or verified domain.
    pub fn tenant(&self, key: &str) -> Option<usize> {
        self.tenants.iter().position(|t| {
            t.tenant_id.eq_ignore_ascii_case(key)
                || t.domain
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case(key))
        })
    }

    /// Registered keys an app reference (`vault/cert` or `vault/cert/version`) stands for.
    fn resolve_ref(&self, reference: &str) -> Vec<RegisteredKey> {
        let parts: Vec<&str> = reference.splitn(3, '/').collect();
        let (Some(vault), Some(cert)) = (parts.first(), parts.get(1)) else {
            return Vec::new();
        };
        let Some(cert) = self
            .vault_by_name(vault)
            .and_then(|i| self.vaults[i].cert(cert))
        else {
            return Vec::new();
        };
        match parts.get(2) {
            Some(ver) => cert
                .version(Some(ver))
                .map(RegisteredKey::of)
                .into_iter()
                .collect(),
            None => cert.versions.iter().map(RegisteredKey::of).collect(),
        }
    }

    /// Registers a new certificate version on every app that references the whole certificate.
    pub fn register_version_on_apps(&mut self, vault: &str, cert: &str, v: &CertVersion) -> usize {
        let wanted = format!("{vault}/{cert}").to_ascii_lowercase();
        let mut count = 0;
        for t in &mut self.tenants {
            for a in &mut t.apps {
                if a.cert_refs.iter().any(|r| r.to_ascii_lowercase() == wanted) {
                    a.keys.push(RegisteredKey::of(v));
                    count += 1;
                }
            }
        }
        count
    }

    /// Records an assertion id; returns `false` if it was already used and is still live.
    pub fn remember_jti(&mut self, client_id: &str, jti: &str, exp: i64, now: i64) -> bool {
        self.seen_jti.retain(|_, e| *e >= now);
        let key = format!("{}|{jti}", client_id.to_ascii_lowercase());
        if self.seen_jti.contains_key(&key) {
            return false;
        }
        self.seen_jti.insert(key, exp.max(now));
        true
    }
}

/// Builds the initial state, generating key material (blocking; run off the async runtime).
pub(crate) fn build_state(config: &EmulatorConfig) -> Result<State, EmulatorError> {
    let default_tenant = config
        .identities
        .first()
        .map(|i| i.tenant_id.clone())
        .or_else(|| config.tenants.first().map(|t| t.tenant_id.clone()))
        .unwrap_or_else(|| "common".to_owned());

    // Generate every generated version on its own thread: 3072/4096-bit keys take a while.
    let mut vaults = Vec::new();
    for v in &config.vaults {
        let certs = std::thread::scope(|s| {
            let handles: Vec<_> = v
                .certificates
                .iter()
                .map(|c| s.spawn(move || make_cert(c)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(EmulatorError::crypto("key generation panicked")))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        vaults.push(Vault {
            name: v.name.clone(),
            tenant_id: v
                .tenant_id
                .clone()
                .unwrap_or_else(|| default_tenant.clone()),
            certs,
            roles: v.role_assignments.clone(),
        });
    }

    let mut state = State {
        vaults,
        tenants: Vec::new(),
        seen_jti: HashMap::new(),
        strict_assertions: config.entra.strict_assertions,
        mi_tokens: HashMap::new(),
    };
    let mut fics: HashMap<String, Vec<FederatedCredentialConfig>> = HashMap::new();
    for a in config.tenants.iter().flat_map(|t| &t.apps) {
        fics.entry(a.client_id.to_ascii_lowercase())
            .or_default()
            .extend(a.federated_credentials.iter().cloned());
    }
    let mut tenants = Vec::new();
    for t in &config.tenants {
        let apps = t
            .apps
            .iter()
            .map(|a| App {
                client_id: a.client_id.clone(),
                display_name: a
                    .display_name
                    .clone()
                    .unwrap_or_else(|| a.client_id.clone()),
                cert_refs: a.certificates.clone(),
                keys: a
                    .certificates
                    .iter()
                    .flat_map(|r| state.resolve_ref(r))
                    .collect(),
                roles: a.roles.clone(),
                enabled: a.enabled,
                lifetime: a.token_lifetime_secs,
                cae_lifetime: a.cae_token_lifetime_secs,
                sp_id: a
                    .service_principal_id
                    .clone()
                    .unwrap_or_else(|| derived_sp_id(&t.tenant_id, &a.client_id)),
                fics: fics
                    .get(&a.client_id.to_ascii_lowercase())
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        tenants.push(Tenant {
            tenant_id: t.tenant_id.clone(),
            domain: t.domain.clone(),
            resources: t.resources.clone(),
            apis: t.apis.clone(),
            apps,
            graph_records: t.graph_records,
        });
    }
    state.tenants = tenants;
    Ok(state)
}

fn make_cert(c: &super::config::CertificateConfig) -> Result<Cert, EmulatorError> {
    let subject = c.subject.clone().unwrap_or_else(|| c.name.clone());
    let versions = match &c.import_pem {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| EmulatorError::io("reading", path, e))?;
            vec![
                keys::import_pem(&text, time::OffsetDateTime::now_utc().unix_timestamp()).map_err(
                    |e| {
                        EmulatorError::Config(format!(
                            "certificate {}: {}: {e}",
                            c.name,
                            path.display()
                        ))
                    },
                )?,
            ]
        }
        // One thread per version: RSA key generation time varies a lot from key to key.
        None => std::thread::scope(|s| {
            let handles: Vec<_> = (0..c.versions)
                .map(|_| {
                    let subject = &subject;
                    s.spawn(move || {
                        keys::self_signed_version(
                            subject,
                            c.key_size,
                            c.validity_days,
                            time::OffsetDateTime::now_utc(),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(EmulatorError::crypto("key generation panicked")))
                })
                .collect::<Result<Vec<_>, _>>()
        })?,
    };
    let key_size = versions.last().map_or(c.key_size, |v| v.key_size);
    Ok(Cert {
        name: c.name.clone(),
        versions,
        key_size,
        subject_cn: subject,
        validity_days: c.validity_days,
        content_type: "application/x-pkcs12".to_owned(),
    })
}

/// A stable service-principal object id per (tenant, app), so tokens are reproducible.
fn derived_sp_id(tenant: &str, client_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!(
        "{}|{}",
        tenant.to_ascii_lowercase(),
        client_id.to_ascii_lowercase()
    ));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

// === impl Shared ===

impl Shared {
    pub fn new(
        endpoints: Endpoints,
        identities: Vec<IdentityConfig>,
        issuer: IssuerKey,
        issuers: ExternalIssuers,
        state: State,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            endpoints,
            identities,
            issuer,
            issuers,
            initial: state.clone(),
            state: Mutex::new(state),
            faults: Faults::default(),
            clock: EmuClock::default(),
            counters: Mutex::new(Counters::default()),
            shutdown,
        }
    }

    /// Locks the state. A poisoned lock only means a handler panicked mid-update; the data is
    /// still usable for an emulator, so recover rather than take every listener down.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restores the configured state, clears faults, counters and what is known of the
    /// external issuers (keys, failures), and sets the clock offset back to 0.
    pub fn reset(&self) {
        *self.state() = self.initial.clone();
        self.counters().reset();
        self.faults.clear();
        self.clock.reset();
        self.issuers.clear();
    }

    /// Unix seconds on the emulator's clock.
    pub fn now_secs(&self) -> i64 {
        self.clock.now_secs()
    }

    /// Issuer of managed-identity tokens for `tenant` (v1, like IMDS), or the v2 issuer for
    /// the token-exchange audience so they can serve as federated credentials.
    pub fn mi_issuer(&self, tenant: &str, resource: &str) -> String {
        if is_token_exchange(resource) {
            self.v2_issuer(tenant)
        } else {
            v1_issuer(tenant)
        }
    }

    pub fn v2_issuer(&self, tenant: &str) -> String {
        format!("{}/{tenant}/v2.0", self.endpoints.authority_host)
    }

    /// An app's federated credentials with `{authority_host}` substituted.
    pub fn federated_credentials(
        &self,
        config_fics: &[FederatedCredentialConfig],
    ) -> Vec<FederatedCredentialConfig> {
        config_fics
            .iter()
            .map(|f| FederatedCredentialConfig {
                issuer: f
                    .issuer
                    .replace("{authority_host}", &self.endpoints.authority_host),
                subject: f.subject.clone(),
                audience: f.audience.clone(),
            })
            .collect()
    }
}

/// The host (and port) the client addressed, so URLs the emulator hands out (key ids,
/// next links, token endpoints) are ones the client can use.
pub(crate) fn request_host(parts: &http::request::Parts) -> String {
    host_of(&parts.headers, &parts.uri)
}

/// The Host header, else the URI's authority (HTTP/2), else loopback.
pub(crate) fn host_of(headers: &http::HeaderMap, uri: &http::Uri) -> String {
    headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "127.0.0.1".to_owned())
}

/// The issuer of a tenant's v1.0 tokens (Graph's, Key Vault's, most managed-identity ones),
/// the same in every cloud the emulator stands for.
pub(crate) fn v1_issuer(tenant: &str) -> String {
    format!("https://sts.windows.net/{tenant}/")
}

pub(crate) fn is_token_exchange(resource: &str) -> bool {
    resource
        .trim_end_matches('/')
        .to_ascii_lowercase()
        .starts_with("api://azureadtokenexchange")
}

// === Counters ===

/// Request counters exposed by `GET /counters`.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Counters {
    /// Per route: all requests, including those answered by a fault.
    pub routes: BTreeMap<String, RouteCount>,
    /// Successful signs per `vault/key/version`.
    pub sign: BTreeMap<String, u64>,
    /// Token requests per `tenant_id/client_id` (tenant as resolved; unknown tenants as sent).
    pub exchanges: BTreeMap<String, RouteCount>,
    /// Managed-identity tokens issued per identity name.
    pub mi_tokens: BTreeMap<String, u64>,
    /// Graph-style requests per tenant id (from the token; `-` when it names none).
    pub graph: BTreeMap<String, RouteCount>,
    /// The last `claims` parameter of a token request per `tenant_id/client_id` (as JSON;
    /// requests without one leave it as it was).
    pub claims: BTreeMap<String, serde_json::Value>,
    /// How many times the counters were reset: a request counted before a reset has its
    /// outcome counted only if none came since (`Counters::reset`), so no route shows an
    /// outcome its total does not count.
    #[serde(skip)]
    pub resets: u64,
}

impl Counters {
    /// Clears every count.
    pub fn reset(&mut self) {
        *self = Counters {
            resets: self.resets.wrapping_add(1),
            ..Counters::default()
        };
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct RouteCount {
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    /// In `routes`: the W3C `traceparent` of the route's latest request that carried one,
    /// so that trace propagation can be checked from outside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl RouteCount {
    pub fn record(&mut self, ok: bool) {
        self.total += 1;
        if ok {
            self.success += 1;
        } else {
            self.failure += 1;
        }
    }
}
