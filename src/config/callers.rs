//! The caller-facing sections of the configuration: `[callers]` (bearer-token issuers and the
//! development identity), `[policy]`, `[audit]` and `[limits]`, with their validation. The
//! client CA for mutual TLS sits with the rest of the listener's TLS in `[server]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use url::Url;

use super::{Config, DAY, HOUR, MAX_BURST, ServerConfig, Validator};
use crate::policy::Policy;

/// Whether TLS clients must present a certificate signed by the caller CA bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    /// Verified when presented; callers without one must bring a bearer token.
    Optional,
    /// The handshake fails without a valid client certificate.
    Required,
}

#[derive(Debug, Clone, Default)]
pub struct CallersConfig {
    /// Development only: a request with no credentials on a plaintext loopback listener is
    /// the caller `dev:loopback`. Refused by validation anywhere else.
    pub dev_loopback: bool,
    /// Bearer-token issuers by their configured name (the `ISSUER` of `jwt:ISSUER:SUBJECT`).
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// How bearer tokens that verified are remembered.
    pub remember: RememberConfig,
}

/// Bearer tokens that verified are remembered (by their SHA-256) so the caller's next
/// requests skip the signature check: at most `tokens` of them, each for at most `max_age`
/// (never past its `exp`, and only while the issuer's keys it verified against are in use).
/// Either at 0 turns the memory off: every request is verified in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberConfig {
    pub tokens: u64,
    pub max_age: Duration,
}

impl Default for RememberConfig {
    fn default() -> Self {
        RememberConfig {
            tokens: 10_000,
            max_age: Duration::from_secs(600),
        }
    }
}

impl RememberConfig {
    pub fn is_off(&self) -> bool {
        self.tokens == 0 || self.max_age.is_zero()
    }
}

/// Upper bounds of `remember_tokens` (about 300 bytes each) and `remember_secs`.
const MAX_REMEMBER_TOKENS: u64 = 1_000_000;
const MAX_REMEMBER_SECS: u64 = 3600;

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: String,
    /// Exact `iss` value.
    pub issuer: String,
    /// The OpenID discovery document (default: `{issuer}/.well-known/openid-configuration`).
    pub discovery_url: Url,
    /// Accepted `aud` values: the broker's own audience.
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    /// The claim that names the caller (`sub`, or `oid`/`appid`/`azp` for Entra).
    pub identity_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// An unknown `kid` refreshes the keys at most this often.
    pub jwks_min_refresh: Duration,
    /// Keys older than this are re-fetched before use.
    pub jwks_max_age: Duration,
}

#[derive(Debug, Clone)]
pub enum PolicyConfig {
    /// No grants: every request is denied.
    None,
    /// Grants in the main file; they change with a restart.
    Inline(Policy),
    /// A grant file that reloads on SIGHUP and when it changes.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub output: AuditOutput,
    /// While the audit trail cannot be written, refuse to serve tokens (the default), or
    /// serve them and keep their records for when it can.
    pub refuse_unaudited: bool,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Sustained requests per second per caller identity.
    pub caller_rate_per_sec: f64,
    pub caller_burst: u32,
    /// Callers whose rate is tracked at once; a new caller is refused while this many were
    /// seen within `caller_idle` (and failed-auth addresses: the least useful dropped first).
    pub max_callers: u64,
    /// A caller's bucket is forgotten after this long without requests.
    pub caller_idle: Duration,
    /// Requests in flight over the whole broker; more are refused with UNAVAILABLE.
    pub max_in_flight: usize,
    /// Requests in flight of one caller identity; more are refused with RESOURCE_EXHAUSTED,
    /// so one caller cannot hold the broker's places while an upstream is slow.
    pub max_in_flight_per_caller: usize,
    pub max_request_bytes: usize,
    /// Failed bearer-token authentications a second per client address (IPv6: per /64)
    /// before that address's new tokens wait; 0: no limit (behind a proxy that makes every
    /// caller one address).
    pub failed_auth_per_sec: f64,
    pub failed_auth_burst: u32,
    /// `WatchToken` streams open at once per caller identity, and over the whole broker.
    pub max_watches_per_caller: u32,
    pub max_watches: usize,
}

/// Algorithms accepted for bearer tokens when an issuer lists none.
pub const DEFAULT_ALGORITHMS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::PS256, Algorithm::ES256];

/// Identity claims an issuer may name callers by.
const IDENTITY_CLAIMS: &[&str] = &["sub", "oid", "appid", "azp"];

// === raw file shape ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallers {
    #[serde(default)]
    dev_loopback: bool,
    /// Default audience for every issuer.
    audience: Option<String>,
    remember_tokens: Option<u64>,
    remember_secs: Option<u64>,
    #[serde(default)]
    issuers: BTreeMap<String, RawIssuer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: Option<String>,
    discovery_url: Option<String>,
    audience: Option<String>,
    algorithms: Option<Vec<String>>,
    identity_claim: Option<String>,
    leeway_secs: Option<u64>,
    jwks_min_refresh_secs: Option<u64>,
    jwks_max_age_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    file: Option<PathBuf>,
    grant: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    output: Option<String>,
    file: Option<PathBuf>,
    on_write_failure: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    caller_rate_per_sec: Option<f64>,
    caller_burst: Option<u32>,
    max_callers: Option<u64>,
    caller_idle_secs: Option<u64>,
    max_in_flight: Option<usize>,
    max_in_flight_per_caller: Option<usize>,
    max_request_bytes: Option<usize>,
    failed_auth_per_sec: Option<f64>,
    failed_auth_burst: Option<u32>,
    max_watches_per_caller: Option<u32>,
    max_watches: Option<usize>,
}

/// https, or http on a loopback host (a local issuer in tests or development).
pub fn secure_or_loopback(u: &Url) -> bool {
    u.scheme() == "https" || (u.scheme() == "http" && super::is_loopback_url(u))
}

impl Validator<'_> {
    pub(super) fn callers(&mut self, raw: RawCallers, server: &ServerConfig) -> CallersConfig {
        if raw.dev_loopback
            && !(server.plaintext && server.listen.ip().is_loopback() && server.tls.is_none())
        {
            self.problem(
                "callers.dev_loopback",
                format!(
                    "the unauthenticated development caller is allowed only with `plaintext = true` on a loopback listen address; here: {}, listen {}{}",
                    if server.plaintext { "plaintext" } else { "TLS" },
                    server.listen,
                    self.listen_source()
                ),
            );
        }
        self.issuer_names = raw.issuers.keys().cloned().collect();
        let mut issuers = BTreeMap::new();
        for (name, ri) in raw.issuers {
            let path = format!("callers.issuers.{name}");
            if !super::valid_name(&name) {
                self.problem(&path, "issuer names use letters, digits, '-', '_' and '.'");
            }
            let Some(issuer) = ri.issuer else {
                self.problem(
                    &format!("{path}.issuer"),
                    "missing: the exact `iss` of the tokens",
                );
                continue;
            };
            let issuer_url = match Url::parse(&issuer) {
                Ok(u) if secure_or_loopback(&u) => Some(u),
                Ok(_) => {
                    self.problem(
                        &format!("{path}.issuer"),
                        "must be an https URL (http only on loopback)",
                    );
                    None
                }
                Err(e) => {
                    self.problem(&format!("{path}.issuer"), format!("not a URL: {e}"));
                    None
                }
            };
            let discovery = match ri.discovery_url {
                Some(d) => match Url::parse(&d) {
                    Ok(u) if secure_or_loopback(&u) => Some(u),
                    Ok(_) => {
                        self.problem(
                            &format!("{path}.discovery_url"),
                            "must be an https URL (http only on loopback)",
                        );
                        None
                    }
                    Err(e) => {
                        self.problem(&format!("{path}.discovery_url"), format!("not a URL: {e}"));
                        None
                    }
                },
                None => issuer_url.as_ref().and_then(|_| {
                    Url::parse(&format!(
                        "{}/.well-known/openid-configuration",
                        issuer.trim_end_matches('/')
                    ))
                    .ok()
                }),
            };
            let audience = ri.audience.or_else(|| raw.audience.clone());
            if audience.as_deref().is_none_or(str::is_empty) {
                self.problem(
                    &format!("{path}.audience"),
                    "missing: the broker's own audience (set [callers] audience or the issuer's audience)",
                );
            }
            let mut algorithms = Vec::new();
            match ri.algorithms {
                None => algorithms.extend_from_slice(DEFAULT_ALGORITHMS),
                Some(names) => {
                    // Each refused name is its own problem; "required" is for a list that
                    // names none.
                    if names.is_empty() {
                        self.problem(
                            &format!("{path}.algorithms"),
                            "at least one algorithm is required",
                        );
                    }
                    for n in names {
                        match n.parse::<Algorithm>() {
                            Ok(a) if !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => algorithms.push(a),
                            _ => self.problem(
                                &format!("{path}.algorithms"),
                                format!("`{n}` is not allowed: use asymmetric algorithms (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
                            ),
                        }
                    }
                }
            }
            let identity_claim = ri.identity_claim.unwrap_or_else(|| "sub".into());
            if !IDENTITY_CLAIMS.contains(&identity_claim.as_str()) {
                self.problem(
                    &format!("{path}.identity_claim"),
                    format!(
                        "`{identity_claim}` is not one of {}",
                        IDENTITY_CLAIMS.join(", ")
                    ),
                );
            }
            if let Some(url) = &issuer_url {
                self.entra_token_version(&path, url, &identity_claim, audience.as_deref());
            }
            let leeway = self.span(
                &format!("{path}.leeway_secs"),
                ri.leeway_secs,
                60,
                (0, 300),
                "clock skew allowed on exp and nbf; more would accept expired tokens",
            );
            let jwks_min_refresh = self.span(
                &format!("{path}.jwks_min_refresh_secs"),
                ri.jwks_min_refresh_secs,
                30,
                (1, HOUR),
                "0 would let every unknown kid fetch the keys",
            );
            let jwks_max_age = self.span(
                &format!("{path}.jwks_max_age_secs"),
                ri.jwks_max_age_secs,
                3600,
                (60, DAY),
                "keys are re-fetched at most once a minute and at least daily",
            );
            if let (Some(discovery_url), Some(audience)) = (discovery, audience) {
                issuers.insert(
                    name.clone(),
                    IssuerConfig {
                        name,
                        issuer,
                        discovery_url,
                        audiences: vec![audience],
                        algorithms,
                        identity_claim,
                        leeway,
                        jwks_min_refresh,
                        jwks_max_age,
                    },
                );
            }
        }
        let mut seen = BTreeSet::new();
        for i in issuers.values() {
            if !seen.insert(i.issuer.clone()) {
                self.problem(
                    &format!("callers.issuers.{}.issuer", i.name),
                    "another issuer entry has the same `issuer`",
                );
            }
        }
        let default = RememberConfig::default();
        let tokens = self.count(
            "callers.remember_tokens",
            raw.remember_tokens,
            default.tokens,
            (0, MAX_REMEMBER_TOKENS),
            "about 300 bytes each; 0 turns the memory off",
        );
        let max_age = self.span(
            "callers.remember_secs",
            raw.remember_secs,
            default.max_age.as_secs(),
            (0, MAX_REMEMBER_SECS),
            "a remembered token is checked again at least this often; 0 turns the memory off",
        );
        CallersConfig {
            dev_loopback: raw.dev_loopback,
            issuers,
            remember: RememberConfig { tokens, max_age },
        }
    }

    pub(super) fn policy(
        &mut self,
        raw: RawPolicy,
        tenants: &BTreeSet<String>,
        server: &ServerConfig,
        callers: &CallersConfig,
    ) -> PolicyConfig {
        match (raw.file, raw.grant) {
            (Some(_), Some(_)) => {
                self.problem(
                    "policy",
                    "give either `file` or inline [[policy.grant]] tables, not both",
                );
                PolicyConfig::None
            }
            (Some(file), None) => {
                let file = self.path(file);
                if !self.reads_files("policy.file", &file) {
                    return PolicyConfig::File(file);
                }
                match std::fs::read_to_string(&file) {
                    Ok(text) => match Policy::parse(&text, tenants) {
                        Ok(policy) => self.unusable_grants(&policy, "policy.file", server, callers),
                        Err(problems) => {
                            for p in problems {
                                self.problem("policy.file", format!("{}: {p}", file.display()));
                            }
                        }
                    },
                    Err(e) => self.problem(
                        "policy.file",
                        format!("cannot read {}: {e}", file.display()),
                    ),
                }
                PolicyConfig::File(file)
            }
            (None, Some(grants)) => {
                match Policy::from_toml_value(grants, tenants, "policy.grant") {
                    Ok(p) => {
                        self.unusable_grants(&p, "policy.grant", server, callers);
                        PolicyConfig::Inline(p)
                    }
                    Err(problems) => {
                        // Each at its own key (`policy.grant[1].tenants: …`), found in this
                        // file like any other.
                        for p in problems {
                            match p.split_once(": ") {
                                Some((path, message)) => self.problem(path, message),
                                None => self.problem("policy.grant", p),
                            }
                        }
                        PolicyConfig::None
                    }
                }
            }
            (None, None) => {
                self.warn(
                    "policy",
                    "no grants: every request is denied; add [[policy.grant]] tables or a policy file",
                );
                PolicyConfig::None
            }
        }
    }

    /// Grants that can never be used: a caller that cannot authenticate as configured, or a
    /// scope Entra refuses with client credentials. Warned, not refused: such a grant is
    /// harmless (it never matches), a live reload of the policy file accepts it, and a
    /// policy file that running replicas accepted must not stop new ones from starting.
    /// Also warned: a scope whose tokens an issuer accepts back as caller credentials.
    fn unusable_grants(
        &mut self,
        policy: &Policy,
        at: &str,
        server: &ServerConfig,
        callers: &CallersConfig,
    ) {
        let client_ca = server.mutual_tls();
        for caller in policy.caller_patterns() {
            if let Some(rest) = caller.strip_prefix("jwt:") {
                let issuer = rest.split(':').next().unwrap_or(rest);
                if !self.issuer_names.contains(issuer) {
                    self.warn(
                        at,
                        format!(
                            "`{caller}` names issuer `{issuer}`, but no [callers.issuers.{issuer}] is configured: its tokens are never accepted; add the issuer or correct the name"
                        ),
                    );
                }
            } else if (caller.starts_with("spiffe:") || caller.starts_with("dns:")) && !client_ca {
                self.warn(
                    at,
                    format!(
                        "`{caller}` is a client-certificate identity, but neither server.client_ca_file nor server.trust_domain_ca_files is configured: it can never authenticate until mutual TLS is set up"
                    ),
                );
            } else if let Some(why) = unvouched(&caller, server) {
                self.warn(at, format!("`{caller}` can never authenticate: {why}"));
            }
        }
        for scope in policy.named_scopes() {
            if let Some(why) = super::client_credentials_scope_problem(scope) {
                // Scopes are named across the policy: a grant's other scopes may be served.
                self.warn(at, format!("granted scope never served: {why}"));
            }
            // A token the broker serves for the scope is an app's token for that audience:
            // a caller granted the scope can present it and be the app, with the app's
            // grants, and the audit trail then names the app, not that caller.
            let resource = scope.strip_suffix("/.default").unwrap_or(scope);
            let same = |a: &String| {
                a.trim_end_matches('/')
                    .eq_ignore_ascii_case(resource.trim_end_matches('/'))
            };
            for issuer in callers.issuers.values() {
                if issuer.audiences.iter().any(same) {
                    self.warn(
                        at,
                        format!(
                            "the tokens served for `{scope}` are accepted back as caller credentials by issuer `{}` (audience `{resource}`): a caller granted this scope can present them and act as the tenant's app, with that app's grants, named as the app in the audit trail; grant the scope only to callers meant to have both",
                            issuer.name
                        ),
                    );
                }
            }
        }
    }

    pub(super) fn audit(&mut self, raw: RawAudit) -> AuditConfig {
        let output = match (raw.output.as_deref().unwrap_or("stdout"), raw.file) {
            ("stdout", None) => AuditOutput::Stdout,
            ("file", Some(f)) => {
                let f = self.path(f);
                let checked = self.reads_files("audit.file", &f);
                // The broker appends to the file: a directory given for it (an empty name is
                // the configuration's own) would stop `serve` at start.
                if checked && f.is_dir() {
                    self.problem(
                        "audit.file",
                        format!(
                            "{} is a directory: name the audit log file in it, such as {}",
                            f.display(),
                            f.join("audit.jsonl").display()
                        ),
                    );
                }
                // The broker creates the file, not its directory.
                else if let Some(dir) = f.parent()
                    && checked
                    && !dir.is_dir()
                {
                    self.problem(
                        "audit.file",
                        format!(
                            "the directory {} does not exist: the broker creates the audit file, not its directory",
                            dir.display()
                        ),
                    );
                }
                // `serve` opens the file for appending at start, creating it if need be.
                else if checked && let Err(e) = appendable(&f) {
                    self.problem(
                        "audit.file",
                        format!(
                            "{} cannot be written: {e}; the broker appends the audit trail to it (creating it when missing), so its directory must be writable by the broker's user",
                            f.display()
                        ),
                    );
                }
                AuditOutput::File(f)
            }
            ("file", None) => {
                self.problem(
                    "audit.file",
                    "missing: the audit log file (output = \"file\")",
                );
                AuditOutput::Stdout
            }
            ("stdout", Some(_)) => {
                self.problem(
                    "audit.file",
                    "set output = \"file\" to write the audit log to a file",
                );
                AuditOutput::Stdout
            }
            (other, _) => {
                self.problem(
                    "audit.output",
                    format!("`{other}` is not one of stdout, file"),
                );
                AuditOutput::Stdout
            }
        };
        let refuse_unaudited = match raw.on_write_failure.as_deref().unwrap_or("refuse") {
            "refuse" => true,
            "serve" => false,
            other => {
                self.problem(
                    "audit.on_write_failure",
                    format!("`{other}` is not one of refuse, serve"),
                );
                true
            }
        };
        AuditConfig {
            output,
            refuse_unaudited,
        }
    }

    pub(super) fn limits(&mut self, raw: RawLimits) -> LimitsConfig {
        let min = crate::limits::MIN_RATE;
        let rate = raw.caller_rate_per_sec.unwrap_or(50.0);
        let rate_ok = rate >= min && rate.is_finite();
        if !rate_ok {
            self.problem(
                "limits.caller_rate_per_sec",
                format!("must be a number of at least {min} (requests per second)"),
            );
        }
        let burst = self.count(
            "limits.caller_burst",
            raw.caller_burst.map(u64::from),
            100,
            (1, MAX_BURST),
            "0 would refuse every request",
        ) as u32;
        let max_in_flight = self.count(
            "limits.max_in_flight",
            raw.max_in_flight.map(|n| n as u64),
            4096,
            (1, 1_000_000),
            "requests over the whole broker; each holds memory and a task",
        ) as usize;
        // An eighth of the broker's by default: a caller, however fast its rate, leaves most
        // places to others while an upstream is slow.
        let max_in_flight_per_caller = self.count(
            "limits.max_in_flight_per_caller",
            raw.max_in_flight_per_caller.map(|n| n as u64),
            (max_in_flight as u64 / 8).max(1),
            (1, max_in_flight as u64),
            "one caller's requests in flight; at most limits.max_in_flight",
        ) as usize;
        let max_request_bytes = self.count(
            "limits.max_request_bytes",
            raw.max_request_bytes.map(|n| n as u64),
            16 * 1024,
            (1024, 4 * 1024 * 1024),
            "a token request is a few hundred bytes; gRPC's own limit is 4 MiB",
        ) as usize;
        let failed_rate = raw.failed_auth_per_sec.unwrap_or(1.0);
        let failed_rate_ok = (failed_rate == 0.0 || failed_rate >= min) && failed_rate.is_finite();
        if !failed_rate_ok {
            self.problem(
                "limits.failed_auth_per_sec",
                format!("must be 0 (no limit) or a number of at least {min} (failures per second)"),
            );
        }
        let failed_burst = self.count(
            "limits.failed_auth_burst",
            raw.failed_auth_burst.map(u64::from),
            20,
            (1, MAX_BURST),
            "0 would refuse every bearer token",
        ) as u32;
        let per_caller = self.count(
            "limits.max_watches_per_caller",
            raw.max_watches_per_caller.map(u64::from),
            100,
            (1, 100_000),
            "open WatchToken streams of one caller",
        ) as u32;
        let max_watches = self.count(
            "limits.max_watches",
            raw.max_watches.map(|n| n as u64),
            10_000,
            (1, 1_000_000),
            "open WatchToken streams over the whole broker",
        ) as usize;
        let max_callers = self.count(
            "limits.max_callers",
            raw.max_callers,
            100_000,
            (1, 10_000_000),
            "callers tracked at once",
        );
        // The cache library asserts an idle time of at most 1000 years: bounded well below.
        let caller_idle = self.span(
            "limits.caller_idle_secs",
            raw.caller_idle_secs,
            600,
            (1, DAY),
            "a caller's bucket is forgotten after this long without requests",
        );
        LimitsConfig {
            max_watches_per_caller: per_caller,
            max_watches,
            failed_auth_per_sec: if failed_rate_ok { failed_rate } else { 1.0 },
            failed_auth_burst: failed_burst,
            caller_rate_per_sec: if rate_ok { rate } else { 1.0 },
            caller_burst: burst,
            max_callers,
            caller_idle,
            max_in_flight,
            max_in_flight_per_caller,
            max_request_bytes,
        }
    }
}

/// Why no configured CA vouches for a client-certificate caller, if none does: with trust
/// domains' CA bundles, only `client_ca_file` vouches for DNS names and for SPIFFE IDs of
/// trust domains not listed (`tls::TrustDomainScopes`).
fn unvouched(caller: &str, server: &ServerConfig) -> Option<String> {
    let tls = server.tls.as_ref()?;
    if tls.trust_domain_ca_files.is_empty() || tls.client_ca_file.is_some() {
        return None;
    }
    if caller.starts_with("dns:") {
        return Some(
            "with server.trust_domain_ca_files, only a CA of server.client_ca_file vouches for DNS names, and no client_ca_file is configured".into(),
        );
    }
    let domain = crate::authn::mtls::trust_domain(caller)?;
    (!tls.trust_domain_ca_files.contains_key(&domain.to_ascii_lowercase())).then(|| {
        format!(
            "trust domain `{domain}` is not in server.trust_domain_ca_files, and no server.client_ca_file is configured to vouch for it"
        )
    })
}

/// The caller-facing part of `check-config`'s summary.
pub(super) fn summary(c: &Config) -> String {
    let mut ways = Vec::new();
    if let Some(tls) = &c.server.tls
        && let Some(ca) = &tls.client_ca_file
    {
        let scope = if tls.trust_domain_ca_files.is_empty() {
            ""
        } else {
            " (DNS names and SPIFFE IDs of other trust domains)"
        };
        ways.push(format!(
            "client certificates ({:?}) from {}{scope}",
            tls.client_cert,
            ca.display()
        ));
    }
    if let Some(tls) = &c.server.tls {
        for (domain, ca) in &tls.trust_domain_ca_files {
            ways.push(format!(
                "client certificates ({:?}) naming spiffe://{domain}/… from {}",
                tls.client_cert,
                ca.display()
            ));
        }
    }
    for i in c.callers.issuers.values() {
        ways.push(format!("bearer JWTs from `{}` ({})", i.name, i.issuer));
    }
    if c.callers.dev_loopback {
        ways.push("`dev:loopback` (development, no credentials)".into());
    }
    if ways.is_empty() {
        ways.push("none".into());
    }
    let policy = match &c.policy {
        PolicyConfig::None => "no grants".to_string(),
        PolicyConfig::Inline(p) => format!("{} inline grant(s)", p.grant_count()),
        PolicyConfig::File(f) => format!("{} (reloads on SIGHUP or change)", f.display()),
    };
    let audit = match &c.audit.output {
        AuditOutput::Stdout => "stdout".to_string(),
        AuditOutput::File(f) => f.display().to_string(),
    };
    format!(
        "\ncallers: {}\npolicy: {policy}\naudit: {audit}\nlimits: {}/s per caller (burst {}), {} in flight ({} per caller)",
        ways.join("; "),
        c.limits.caller_rate_per_sec,
        c.limits.caller_burst,
        c.limits.max_in_flight,
        c.limits.max_in_flight_per_caller,
    )
}

/// Microsoft's Entra ID sign-in hosts (public and national clouds) and v1.0 token issuer hosts.
const ENTRA_HOSTS: &[&str] = &[
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
    "sts.windows.net",
    "sts.chinacloudapi.cn",
];

impl Validator<'_> {
    /// Entra ID's access tokens come in two versions, chosen by the API's app registration
    /// (`accessTokenAcceptedVersion`), each with its own issuer, audience form and claim for
    /// the calling app. A configuration that mixes them accepts no token at all; warned, as
    /// the broker cannot see the registration.
    fn entra_token_version(
        &mut self,
        path: &str,
        issuer: &Url,
        identity_claim: &str,
        audience: Option<&str>,
    ) {
        let Some(host) = issuer.host_str() else {
            return;
        };
        if !ENTRA_HOSTS.iter().any(|h| host.eq_ignore_ascii_case(h)) {
            return;
        }
        let v2 = issuer.path().trim_end_matches('/').ends_with("/v2.0");
        match (v2, identity_claim) {
            (true, "appid") => self.warn(
                &format!("{path}.identity_claim"),
                "Entra ID v2.0 tokens (this issuer) carry the calling app in `azp`, not `appid` (a v1.0 claim): no token names a caller; use `azp` (or `oid`)",
            ),
            (false, "azp") => self.warn(
                &format!("{path}.identity_claim"),
                "Entra ID v1.0 tokens (this issuer) carry the calling app in `appid`, not `azp` (a v2.0 claim): no token names a caller; use `appid` (or `oid`)",
            ),
            _ => {}
        }
        if let Some(aud) = audience
            && v2
            && uuid::Uuid::parse_str(aud).is_err()
        {
            self.warn(
                path,
                format!(
                    "Entra ID v2.0 access tokens carry the API's client id (a GUID) in `aud`, never an App ID URI such as `{aud}`: no token from this issuer matches; set this issuer's audience to the client id of the broker's API app registration"
                ),
            );
        }
    }
}

/// Whether the audit file can be opened for appending as `serve` opens it, without changing
/// anything: an existing file is opened for appending and closed; for a missing one a
/// file of a name of its own is created beside it and removed.
fn appendable(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().append(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other.map(drop),
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let probe = path.with_file_name(format!(".{name}.check-config-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}
