//! The emulator's TOML configuration: managed identities, vaults (certificates and role
//! assignments) and Entra tenants (app registrations, federated credentials), plus the demo
//! configuration used by `tokenbroker dev`. Parsing and validation live here; nothing else
//! reads the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::EmulatorError;

/// Longest token lifetime the emulator issues (ten years): far beyond Entra's day, for
/// testing how clients treat odd lifetimes, and small enough for any time arithmetic.
pub const MAX_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;
/// Default access-token lifetime range, like Entra's "random value between 60 and 90 minutes".
const DEFAULT_LIFETIME: [u64; 2] = [3600, 5400];

/// The whole emulated estate. See `docs/EMULATOR.md` for the format.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Managed identities of the host the broker runs on.
    #[serde(default)]
    pub identities: Vec<IdentityConfig>,
    /// Key Vaults; the first one also answers requests addressed to `127.0.0.1`/`localhost`.
    #[serde(default)]
    pub vaults: Vec<VaultConfig>,
    /// Entra ID tenants and their app registrations.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// How the Entra ID token endpoint checks client assertions.
    #[serde(default)]
    pub entra: EntraConfig,
}

/// Checks beyond Entra ID's own, for proving that a client also works with stricter servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// Refuse a certificate assertion whose `jti` this client already presented (RFC 7523
    /// lets a server keep assertions to one use; Entra ID does not: MSAL reuses one
    /// assertion for up to 9 minutes), and one that lives longer than an hour (Entra ID
    /// sets no limit). Off by default, as in Entra ID.
    #[serde(default)]
    pub strict_assertions: bool,
}

/// One managed identity (system- or user-assigned).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// A label used in counters and logs.
    pub name: String,
    pub client_id: String,
    /// The principal (object) id: the `oid` of its tokens and the subject of role assignments.
    pub object_id: String,
    /// ARM resource id; derived from the name when omitted.
    #[serde(default)]
    pub resource_id: Option<String>,
    /// At most one identity may be system-assigned.
    #[serde(default)]
    pub system_assigned: bool,
    /// Home tenant of the identity (`tid` of its tokens).
    pub tenant_id: String,
    /// How long its tokens live (default a day, as Azure's). The endpoint hands out the
    /// token it issued until that expires, as IMDS does, so a short lifetime shows how a
    /// client treats a cached token near its end.
    #[serde(default)]
    pub token_lifetime_secs: Option<u64>,
}

impl IdentityConfig {
    /// The ARM resource id, made up when the config does not name one.
    pub fn resource_id(&self) -> String {
        self.resource_id.clone().unwrap_or_else(|| {
            format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
                self.name
            )
        })
    }
}

/// One Key Vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// The vault name: host `{name}.vault.azure.net`.
    pub name: String,
    /// The vault's tenant: named in the 401 challenge, and the only tenant whose tokens it
    /// accepts. Defaults to the first identity's (or tenant's) id.
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    #[serde(default)]
    pub role_assignments: Vec<RoleAssignmentConfig>,
}

/// A certificate (and its key of the same name) in a vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub name: String,
    /// Only `"RSA"` is supported: Entra only accepts RSA certificates for app credentials.
    #[serde(default = "default_key_type")]
    pub key_type: String,
    /// 2048, 3072 or 4096.
    #[serde(default = "default_key_size")]
    pub key_size: usize,
    /// How many self-signed versions to generate; the last one is current.
    #[serde(default = "default_versions")]
    pub versions: usize,
    /// Import this PEM (certificate + unencrypted PKCS#8 or PKCS#1 RSA key) as the only
    /// version instead of generating keys. Relative paths are relative to the config file.
    #[serde(default)]
    pub import_pem: Option<PathBuf>,
    /// X.509 subject common name; defaults to the certificate name.
    #[serde(default)]
    pub subject: Option<String>,
    /// Validity of generated versions in days.
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
}

fn default_key_type() -> String {
    "RSA".to_owned()
}
fn default_key_size() -> usize {
    2048
}
fn default_versions() -> usize {
    1
}
fn default_validity_days() -> u32 {
    365
}

/// Key Vault data-plane RBAC roles the emulator understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VaultRole {
    /// Sign/verify and read keys.
    #[serde(rename = "Key Vault Crypto User")]
    CryptoUser,
    /// Everything on keys.
    #[serde(rename = "Key Vault Crypto Officer")]
    CryptoOfficer,
    /// Read certificates (and their keys' public parts).
    #[serde(rename = "Key Vault Certificate User")]
    CertificateUser,
    /// Read and import certificates.
    #[serde(rename = "Key Vault Certificates Officer")]
    CertificatesOfficer,
    /// Read metadata of keys and certificates.
    #[serde(rename = "Key Vault Reader")]
    Reader,
    /// Everything.
    #[serde(rename = "Key Vault Administrator")]
    Administrator,
}

/// A role assignment on a vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleAssignmentConfig {
    /// Object id of the principal (the `oid` claim of its tokens).
    pub principal: String,
    pub role: VaultRole,
    /// `"*"` (the vault), `"keys/NAME"` or `"certificates/NAME"`.
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_scope() -> String {
    "*".to_owned()
}

/// An Entra ID tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub tenant_id: String,
    /// Verified domain, usable instead of the id in token URLs.
    #[serde(default)]
    pub domain: Option<String>,
    /// Resource identifiers (audiences) known in this tenant, e.g. `https://graph.microsoft.com`:
    /// their tokens are v1.0, as for Microsoft's APIs and any API app registration that does
    /// not ask for v2.0.
    #[serde(default)]
    pub resources: Vec<String>,
    /// API app registrations with their own client id, whose manifest may ask for v2.0
    /// tokens (`accessTokenAcceptedVersion`).
    #[serde(default)]
    pub apis: Vec<ApiConfig>,
    /// Apps with a service principal in this tenant. A multi-tenant app is the same
    /// `client_id` listed under several tenants.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// Records in this tenant's Graph-style sign-in log (`GET /graph/v1.0/auditLogs/signIns`).
    #[serde(default = "default_graph_records")]
    pub graph_records: u32,
}

/// Default size of each tenant's demo sign-in log: enough for several pages of 10.
pub const DEFAULT_GRAPH_RECORDS: u32 = 35;

fn default_graph_records() -> u32 {
    DEFAULT_GRAPH_RECORDS
}

/// An app (its service principal) in a tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub client_id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Registered certificate credentials: `"vault/cert"` (every version's key) or
    /// `"vault/cert/version"` (one version).
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Application roles granted on every resource (the `roles` claim).
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredentialConfig>,
    /// `[min, max]` seconds; each token gets a random lifetime in this range.
    #[serde(default = "default_lifetime")]
    pub token_lifetime_secs: [u64; 2],
    /// `[min, max]` seconds for tokens asked for with the `cp1` client capability (CAE
    /// tokens, which Entra issues for up to a day); unset: `token_lifetime_secs`.
    #[serde(default)]
    pub cae_token_lifetime_secs: Option<[u64; 2]>,
    /// The service principal's object id in this tenant; derived when omitted.
    #[serde(default)]
    pub service_principal_id: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_lifetime() -> [u64; 2] {
    DEFAULT_LIFETIME
}

/// An API's app registration, as tokens for it are issued.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Its application ID URI (`api://…`); `{uri}/.default` asks for its tokens, as does
    /// `{client_id}/.default`.
    pub uri: String,
    pub client_id: String,
    /// `accessTokenAcceptedVersion`: 1 (the default, as Entra's) or 2. A v2.0 token's `aud`
    /// is the API's client id whatever the request named, its issuer
    /// `{authority_host}/{tid}/v2.0`, and it names the calling app in `azp`; a v1.0 token's
    /// `aud` is the identifier asked for, its issuer `https://sts.windows.net/{tid}/`, and
    /// it names the calling app in `appid`.
    #[serde(default = "default_token_version")]
    pub access_token_version: u8,
}

fn default_token_version() -> u8 {
    1
}

/// A federated identity credential on an app registration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedCredentialConfig {
    /// Expected `iss`. `{authority_host}` is replaced by the emulator's authority host, so
    /// `"{authority_host}/TENANT/v2.0"` names managed-identity tokens issued by this emulator.
    /// Any other issuer is an external OpenID issuer (a Kubernetes cluster's OIDC issuer):
    /// its signing keys are fetched from its discovery document when a token names it, so it
    /// must be https, or http on a loopback host.
    pub issuer: String,
    /// Expected `sub`: for a managed identity, its object id; for a Kubernetes service
    /// account, `system:serviceaccount:NAMESPACE:NAME`.
    pub subject: String,
    #[serde(default = "default_fic_audience")]
    pub audience: String,
}

fn default_fic_audience() -> String {
    "api://AzureADTokenExchange".to_owned()
}

// === impl EmulatorConfig ===

impl EmulatorConfig {
    /// Reads and validates a TOML file. `import_pem` paths are resolved against its directory.
    pub fn from_toml_file(path: &Path) -> Result<Self, EmulatorError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| EmulatorError::io("reading", path, e))?;
        let mut config: EmulatorConfig =
            toml::from_str(&text).map_err(|source| EmulatorError::Toml {
                path: path.to_owned(),
                source,
            })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for vault in &mut config.vaults {
            for cert in &mut vault.certificates {
                if let Some(p) = &cert.import_pem
                    && p.is_relative()
                {
                    cert.import_pem = Some(base.join(p));
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (relative `import_pem` paths stay relative to the working directory).
    pub fn from_toml_str(text: &str) -> Result<Self, EmulatorError> {
        let config: EmulatorConfig =
            toml::from_str(text).map_err(|source| EmulatorError::Toml {
                path: PathBuf::from("<string>"),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The demo estate used by `tokenbroker dev`: a broker host with a system-assigned identity
    /// (and a user-assigned one trusted as a federated credential), vault `tb-demo` with the
    /// certificates `contoso-app` (RSA 2048, 2 versions) and `fabrikam-app` (RSA 3072), and
    /// two tenants each with its own app. The GUIDs are fixed and easy to spot in logs.
    pub fn demo() -> Self {
        let contoso = demo::CONTOSO_TENANT;
        let fabrikam = demo::FABRIKAM_TENANT;
        let graph = "https://graph.microsoft.com".to_owned();
        let app =
            |client_id: &str, name: &str, cert: &str, fics: Vec<FederatedCredentialConfig>| {
                AppConfig {
                    client_id: client_id.to_owned(),
                    display_name: Some(name.to_owned()),
                    certificates: vec![format!("{}/{cert}", demo::VAULT)],
                    roles: vec!["Files.Read.All".to_owned()],
                    enabled: true,
                    federated_credentials: fics,
                    token_lifetime_secs: DEFAULT_LIFETIME,
                    cae_token_lifetime_secs: None,
                    service_principal_id: None,
                }
            };
        let cert = |name: &str, key_size: usize, versions: usize| CertificateConfig {
            name: name.to_owned(),
            key_type: default_key_type(),
            key_size,
            versions,
            import_pem: None,
            subject: None,
            validity_days: default_validity_days(),
        };
        EmulatorConfig {
            identities: vec![
                IdentityConfig {
                    name: "broker".to_owned(),
                    client_id: demo::BROKER_MI_CLIENT_ID.to_owned(),
                    object_id: demo::BROKER_MI_OBJECT_ID.to_owned(),
                    resource_id: None,
                    system_assigned: true,
                    tenant_id: contoso.to_owned(),
                    token_lifetime_secs: None,
                },
                IdentityConfig {
                    name: "broker-fic".to_owned(),
                    client_id: demo::FIC_MI_CLIENT_ID.to_owned(),
                    object_id: demo::FIC_MI_OBJECT_ID.to_owned(),
                    resource_id: None,
                    system_assigned: false,
                    tenant_id: contoso.to_owned(),
                    token_lifetime_secs: None,
                },
            ],
            vaults: vec![VaultConfig {
                name: demo::VAULT.to_owned(),
                tenant_id: Some(contoso.to_owned()),
                certificates: vec![cert("contoso-app", 2048, 2), cert("fabrikam-app", 3072, 1)],
                role_assignments: vec![
                    RoleAssignmentConfig {
                        principal: demo::BROKER_MI_OBJECT_ID.to_owned(),
                        role: VaultRole::CryptoUser,
                        scope: "*".to_owned(),
                    },
                    RoleAssignmentConfig {
                        principal: demo::BROKER_MI_OBJECT_ID.to_owned(),
                        role: VaultRole::CertificateUser,
                        scope: "*".to_owned(),
                    },
                ],
            }],
            tenants: vec![
                TenantConfig {
                    tenant_id: contoso.to_owned(),
                    domain: Some("contoso.onmicrosoft.com".to_owned()),
                    resources: vec![graph.clone()],
                    apis: vec![ApiConfig {
                        uri: "api://contoso-api".to_owned(),
                        client_id: demo::CONTOSO_API.to_owned(),
                        access_token_version: 2,
                    }],
                    apps: vec![app(
                        demo::CONTOSO_APP,
                        "Contoso daemon",
                        "contoso-app",
                        vec![FederatedCredentialConfig {
                            issuer: format!("{{authority_host}}/{contoso}/v2.0"),
                            subject: demo::FIC_MI_OBJECT_ID.to_owned(),
                            audience: default_fic_audience(),
                        }],
                    )],
                    graph_records: DEFAULT_GRAPH_RECORDS,
                },
                TenantConfig {
                    tenant_id: fabrikam.to_owned(),
                    domain: Some("fabrikam.onmicrosoft.com".to_owned()),
                    resources: vec![graph],
                    apis: vec![],
                    apps: vec![app(
                        demo::FABRIKAM_APP,
                        "Fabrikam daemon",
                        "fabrikam-app",
                        vec![],
                    )],
                    graph_records: 12,
                },
            ],
            entra: EntraConfig::default(),
        }
    }

    /// Checks references and uniqueness so that the running emulator never meets a dangling name.
    pub fn validate(&self) -> Result<(), EmulatorError> {
        let err = |m: String| Err(EmulatorError::Config(m));
        if self.identities.iter().filter(|i| i.system_assigned).count() > 1 {
            return err("at most one identity may be system_assigned".into());
        }
        let mut seen = HashSet::new();
        for i in &self.identities {
            if i.token_lifetime_secs
                .is_some_and(|l| !(60..=MAX_LIFETIME_SECS).contains(&l))
            {
                return err(format!(
                    "identity {}: token_lifetime_secs must be 60 to {MAX_LIFETIME_SECS}",
                    i.name
                ));
            }
            if !seen.insert(i.client_id.to_ascii_lowercase())
                || !seen.insert(i.object_id.to_ascii_lowercase())
            {
                return err(format!(
                    "identity {}: duplicate client_id or object_id",
                    i.name
                ));
            }
        }
        for t in &self.tenants {
            for a in &t.apis {
                if !matches!(a.access_token_version, 1 | 2) {
                    return err(format!(
                        "tenant {}: api {}: access_token_version must be 1 or 2",
                        t.tenant_id, a.uri
                    ));
                }
            }
        }
        let mut vault_names = HashSet::new();
        for v in &self.vaults {
            if !vault_names.insert(v.name.to_ascii_lowercase()) {
                return err(format!("duplicate vault {}", v.name));
            }
            let mut cert_names = HashSet::new();
            for c in &v.certificates {
                if !cert_names.insert(c.name.to_ascii_lowercase()) {
                    return err(format!(
                        "vault {}: duplicate certificate {}",
                        v.name, c.name
                    ));
                }
                if !c.key_type.eq_ignore_ascii_case("RSA") {
                    return err(format!(
                        "certificate {}: only key_type RSA is supported",
                        c.name
                    ));
                }
                if ![2048, 3072, 4096].contains(&c.key_size) {
                    return err(format!(
                        "certificate {}: key_size must be 2048, 3072 or 4096",
                        c.name
                    ));
                }
                if c.import_pem.is_none() && c.versions == 0 {
                    return err(format!(
                        "certificate {}: versions must be at least 1",
                        c.name
                    ));
                }
            }
            for r in &v.role_assignments {
                let ok = r.scope == "*"
                    || r.scope.strip_prefix("keys/").is_some_and(|n| !n.is_empty())
                    || r.scope
                        .strip_prefix("certificates/")
                        .is_some_and(|n| !n.is_empty());
                if !ok {
                    return err(format!(
                        "vault {}: role scope {:?} must be \"*\", \"keys/NAME\" or \"certificates/NAME\"",
                        v.name, r.scope
                    ));
                }
            }
        }
        let mut tenant_keys = HashSet::new();
        for t in &self.tenants {
            if !tenant_keys.insert(t.tenant_id.to_ascii_lowercase()) {
                return err(format!("duplicate tenant {}", t.tenant_id));
            }
            if let Some(d) = &t.domain
                && !tenant_keys.insert(d.to_ascii_lowercase())
            {
                return err(format!("duplicate tenant domain {d}"));
            }
            let mut apps = HashSet::new();
            for a in &t.apps {
                if !apps.insert(a.client_id.to_ascii_lowercase()) {
                    return err(format!(
                        "tenant {}: app {} listed twice",
                        t.tenant_id, a.client_id
                    ));
                }
                let lifetimes = [
                    ("token_lifetime_secs", Some(a.token_lifetime_secs)),
                    ("cae_token_lifetime_secs", a.cae_token_lifetime_secs),
                ];
                for (name, range) in lifetimes {
                    let Some([lo, hi]) = range else { continue };
                    if lo == 0 || lo > hi || hi > MAX_LIFETIME_SECS {
                        return err(format!(
                            "app {}: {name} must be [min, max] with 0 < min <= max <= {MAX_LIFETIME_SECS}",
                            a.client_id
                        ));
                    }
                }
                for c in &a.certificates {
                    self.check_cert_ref(c)?;
                }
                for f in &a.federated_credentials {
                    // Entra takes only https issuers; http is for a local issuer in tests.
                    let issuer = f.issuer.replace("{authority_host}", "https://127.0.0.1");
                    let ok = url::Url::parse(&issuer)
                        .is_ok_and(|u| crate::config::secure_or_loopback(&u));
                    if !ok {
                        return err(format!(
                            "app {}: federated credential issuer {:?} must be an https URL (http only on a loopback host), or start with {{authority_host}}",
                            a.client_id, f.issuer
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_cert_ref(&self, reference: &str) -> Result<(), EmulatorError> {
        let mut parts = reference.splitn(3, '/');
        let (vault, cert) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let found = self.vaults.iter().any(|v| {
            v.name.eq_ignore_ascii_case(vault)
                && v.certificates
                    .iter()
                    .any(|c| c.name.eq_ignore_ascii_case(cert))
        });
        if found {
            Ok(())
        } else {
            Err(EmulatorError::Config(format!(
                "app certificate {reference:?} must name a configured \"vault/certificate[/version]\""
            )))
        }
    }
}

/// Fixed identifiers of the demo estate, public so the broker's dev mode can print them.
pub mod demo {
    /// Contoso tenant (also the broker host's home tenant).
    pub const CONTOSO_TENANT: &str = "c0c0c0c0-0000-4000-8000-00000000c001";
    /// Fabrikam tenant.
    pub const FABRIKAM_TENANT: &str = "fabfab00-0000-4000-8000-00000000fab1";
    /// The broker host's system-assigned identity.
    pub const BROKER_MI_CLIENT_ID: &str = "b0b0b0b0-0000-4000-8000-0000000000c1";
    /// Object id of the system-assigned identity.
    pub const BROKER_MI_OBJECT_ID: &str = "b0b0b0b0-0000-4000-8000-0000000000d1";
    /// A user-assigned identity trusted by the Contoso app as a federated credential.
    pub const FIC_MI_CLIENT_ID: &str = "f1c0f1c0-0000-4000-8000-0000000000c2";
    /// Object id of the federated-credential identity.
    pub const FIC_MI_OBJECT_ID: &str = "f1c0f1c0-0000-4000-8000-0000000000d2";
    /// The Contoso app registration.
    pub const CONTOSO_APP: &str = "c0c0c0c0-a990-4000-8000-000000000a01";
    /// The Contoso tenant's own API (`api://contoso-api`), which takes v2.0 tokens.
    pub const CONTOSO_API: &str = "c0c0c0c0-a91a-4000-8000-000000000a03";
    /// The Fabrikam app registration.
    pub const FABRIKAM_APP: &str = "fabfab00-a990-4000-8000-000000000a02";
    /// The demo vault.
    pub const VAULT: &str = "tb-demo";
}
