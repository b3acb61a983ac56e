//! The one place errors become gRPC status. Messages say what failed and what to do, carry
//! the Entra error code and correlation id where there is one, and never a token.

use std::time::Duration;

use tonic::{Code, Status};

use crate::access::AccessError;
use crate::api::Failure;
use crate::authn::{AuthnError, JwtError};
use crate::broker::{BrokerError, FlowError, MAX_RETRY_AFTER};
use crate::entra::{EntraError, EntraErrorClass};
use crate::identity::IdentityError;
use crate::signer::{SignerError, keyvault, pkcs11};

/// Metadata key carrying a retry hint in seconds on UNAVAILABLE and RESOURCE_EXHAUSTED.
pub const RETRY_AFTER_KEY: &str = "retry-after";

/// The message of a policy denial: the same for an unknown tenant and a forbidden one, so a
/// caller cannot map the broker's tenants. It names the caller's own identity, what the
/// policy is asked about: with a client certificate and a bearer token on one request the
/// token decides, and the grant to ask for is the one for the identity named here.
pub fn denied_message(caller: &str) -> String {
    format!(
        "not granted: caller `{caller}` may not have tokens for this tenant and these scopes (the broker's policy grants them to identities)"
    )
}

pub fn failure_status(f: &Failure) -> Status {
    match f {
        Failure::Access(e) => access_status(e),
        Failure::Broker(e) => to_status(e),
    }
}

pub fn access_status(e: &AccessError) -> Status {
    match e {
        AccessError::Unauthenticated(AuthnError::Jwt(JwtError::KeysUnavailable {
            retry_after,
            ..
        })) => with_retry(
            Status::unavailable(format!("cannot authenticate the caller now: {e}")),
            Some(*retry_after),
        ),
        AccessError::Unauthenticated(AuthnError::Jwt(JwtError::TooManyFailures {
            retry_after,
        })) => with_retry(
            Status::resource_exhausted(format!(
                "{e}: tokens from this address are checked again after the hinted delay (tokens that verified before are not affected)"
            )),
            Some(*retry_after),
        ),
        AccessError::Unauthenticated(a) => Status::unauthenticated(a.to_string()),
        AccessError::Denied { caller } => Status::permission_denied(denied_message(caller)),
        AccessError::RateLimited { retry_after, .. } => with_retry(
            Status::resource_exhausted(
                "over this caller's request rate; retry after the hinted delay",
            ),
            Some(*retry_after),
        ),
        AccessError::CallersFull { retry_after, .. } => with_retry(
            Status::resource_exhausted(format!(
                "{e}; retry after the hinted delay, or on another replica (operators: raise limits.max_callers)"
            )),
            Some(*retry_after),
        ),
        AccessError::CallerInFlight { .. } => with_retry(
            Status::resource_exhausted(format!("{e}; retry when one of them has been answered")),
            Some(Duration::from_secs(1)),
        ),
        AccessError::Overloaded => with_retry(
            Status::unavailable("the broker is at its limit of requests in flight; retry shortly"),
            Some(Duration::from_secs(1)),
        ),
        AccessError::TooManyWatches { .. } => Status::resource_exhausted(e.to_string()),
        AccessError::WatchesFull(_) => with_retry(
            Status::unavailable(format!("{e}; retry later or on another replica")),
            Some(Duration::from_secs(5)),
        ),
        AccessError::CredentialExpired { .. } | AccessError::CertificateNoLongerAccepted { .. } => {
            Status::unauthenticated(e.to_string())
        }
        AccessError::AuditUnavailable { .. } => with_retry(
            Status::unavailable(format!(
                "{e}: retry later or on another replica (operators: free the audit file's disk or fix its output)"
            )),
            Some(Duration::from_secs(5)),
        ),
    }
}

/// Entra's correlation id of a failed upstream exchange, for the audit record.
pub fn entra_correlation_id(e: &BrokerError) -> Option<String> {
    match e {
        BrokerError::Upstream { source, .. } => match source.as_ref() {
            FlowError::Entra(err) => err.correlation_id.clone(),
            _ => None,
        },
        _ => None,
    }
}

pub fn to_status(e: &BrokerError) -> Status {
    match e {
        BrokerError::InvalidArgument { field, message } => {
            Status::invalid_argument(format!("{field}: {message}"))
        }
        BrokerError::UnknownTenant(name) => Status::not_found(format!(
            "tenant `{name}` is not configured in this broker; check the name against [tenants] in its configuration"
        )),
        BrokerError::MinValidityBeyondLifetime { issued, wanted } => Status::out_of_range(format!(
            "min_validity: tokens for this tenant and scopes are issued valid for {}s (Entra's token lifetime), less than the {}s asked for; ask for at most {}s",
            issued.as_secs(),
            wanted.as_secs(),
            issued.as_secs()
        )),
        BrokerError::MinValidityUnmet { remaining, wanted } => Status::out_of_range(format!(
            "min_validity: Entra issued a token valid for {}s, less than the {}s asked for; ask for less",
            remaining.as_secs(),
            wanted.as_secs()
        )),
        BrokerError::ShuttingDown => with_retry(
            Status::unavailable("the broker is shutting down; retry on another replica"),
            Some(Duration::from_secs(1)),
        ),
        BrokerError::Upstream {
            tenant,
            source,
            remembered,
        } => {
            let status = upstream(tenant, source);
            match remembered {
                Some(left) => Status::with_metadata(
                    status.code(),
                    format!("{} {}", status.message(), remembered_note(*left)),
                    status.metadata().clone(),
                ),
                None => status,
            }
        }
    }
}

/// What a caller or a watcher is told of a configuration failure the broker remembers for
/// `left` more: when its key is asked again, and how to have it asked at once.
pub fn remembered_note(left: Duration) -> String {
    format!(
        "(remembered: this tenant and these scopes are not asked for again for {}; SIGHUP the broker to ask at once)",
        span_text(left)
    )
}

/// A span for people, in whole seconds: `45s`, `4m 10s`, `2h 0m 5s`.
fn span_text(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

fn upstream(tenant: &str, e: &FlowError) -> Status {
    match e {
        FlowError::Entra(err) => {
            let msg = format!("tenant `{tenant}`: {err}");
            match err.class {
                EntraErrorClass::Retryable => with_retry(
                    Status::unavailable(format!(
                        "{msg}; Entra ID is throttling or unavailable, retry later"
                    )),
                    Some(upstream_hint(err.retry_after)),
                ),
                EntraErrorClass::Caller => Status::invalid_argument(format!(
                    "scopes: {msg}; ask for exactly one resource's `/.default` scope known to the tenant"
                )),
                // Entra says "expired on application" when the registered key credential's
                // validity has ended (or not begun): a renewal, not an upload, is missing.
                EntraErrorClass::KeyRejected if err.description.contains("expired") => {
                    Status::failed_precondition(format!(
                        "{msg}; the certificate has expired (or is not valid yet): renew it (a new version in Key Vault, or a new key and certificate on the HSM) and upload the new certificate's public part to the app"
                    ))
                }
                EntraErrorClass::KeyRejected => Status::failed_precondition(format!(
                    "{msg}; the app registration does not accept the signing certificate: upload the certificate's public part to the app (or check the configured algorithm/thumbprint)"
                )),
                EntraErrorClass::Clock => Status::failed_precondition(format!(
                    "{msg}; the assertion was outside its validity window: check this host's clock"
                )),
                // A permanent redirect: the token endpoint asked is not Entra's.
                EntraErrorClass::Configuration if err.error == "redirect" => {
                    Status::failed_precondition(format!("{msg}; {REDIRECT_HINT}"))
                }
                EntraErrorClass::Configuration => Status::failed_precondition(format!(
                    "{msg}; {}",
                    config_hint(err.codes.first().copied())
                )),
            }
        }
        FlowError::Identity(err) => {
            let msg = format!("tenant `{tenant}`: {err}");
            match err {
                IdentityError::Unavailable { retry_after, .. } => with_retry(
                    Status::unavailable(format!(
                        "{msg}; the broker could not get the managed identity token it presents to Entra (the managed identity endpoint, or Entra for a workload identity, failed or did not answer): retry later"
                    )),
                    Some(upstream_hint(*retry_after)),
                ),
                IdentityError::NotConfigured(_) => Status::failed_precondition(format!(
                    "{msg}; restart the broker after adding a tenant with this identity"
                )),
                IdentityError::NotAssigned { .. } => Status::failed_precondition(format!(
                    "{msg}; assign the user-assigned identity to this host (the VM or scale set, or the App Service, Function or Container App) or correct the tenant's credential.client_id (the identity's client id, not its object id)"
                )),
                IdentityError::Refused { answer, .. } => Status::failed_precondition(format!(
                    "{msg}; {}",
                    federated_identity_hint(answer)
                )),
                IdentityError::Misdirected { .. } => {
                    Status::failed_precondition(format!("{msg}; {IDENTITY_REDIRECT_HINT}"))
                }
            }
        }
        FlowError::Signer(err) => {
            let msg = format!("tenant `{tenant}`: {err}");
            match err {
                SignerError::Unavailable { retry_after, .. } => with_retry(
                    Status::unavailable(format!("{msg}; retry later")),
                    Some(upstream_hint(*retry_after)),
                ),
                SignerError::Identity { retry_after, .. } => with_retry(
                    Status::unavailable(format!(
                        "{msg}; the broker's own identity could not get a token for Key Vault (its managed identity endpoint, or Entra for workload identity, failed or did not answer): retry later"
                    )),
                    Some(upstream_hint(*retry_after)),
                ),
                // The host has several identities and the broker named none: nothing to correct.
                SignerError::IdentityNotAssigned { unnamed: true, .. } => {
                    Status::failed_precondition(format!(
                        "{msg}; the host has several user-assigned identities: set identity.client_id to the client id of the one the broker is to use (the identity's client id, not its object id)"
                    ))
                }
                SignerError::IdentityNotAssigned { .. } => Status::failed_precondition(format!(
                    "{msg}; assign the identity to the host (the VM or scale set, or the App Service, Function or Container App) or correct identity.client_id (the identity's client id, not its object id)"
                )),
                // The broker's own identity, for every tenant: the operator must fix the
                // app registration's federated credential (or the pod's service account).
                SignerError::IdentityRefused(answer) => {
                    Status::failed_precondition(format!("{msg}; {}", identity_hint(answer)))
                }
                SignerError::Forbidden { service, .. } if *service == pkcs11::SERVICE => {
                    Status::failed_precondition(format!(
                        "{msg}; check the token user's PIN in the file or environment variable the tenant's credential names (pin_file or pin_env), and that the PIN is not locked"
                    ))
                }
                // Refused even with a token fetched anew (a stale one is replaced first):
                // not a role the identity lacks (that is 403) but a token the vault will not take.
                SignerError::Forbidden { status: 401, .. } => Status::failed_precondition(format!(
                    "{msg}; Key Vault refused a freshly fetched managed identity token: check that the vault is in the tenant of the broker's identity and that the broker's identity is the one its host or pod provides"
                )),
                // Key Vault's network rules, not the identity's rights: no role helps.
                SignerError::Forbidden { code, .. }
                    if matches!(
                        code.as_str(),
                        "ForbiddenByFirewall" | "ForbiddenByConnection"
                    ) =>
                {
                    Status::failed_precondition(format!(
                        "{msg}; the vault's firewall or private link settings refuse the broker's network: allow the broker's outbound address or subnet in the vault's networking (or reach it through a private endpoint whose DNS the broker resolves)"
                    ))
                }
                SignerError::Forbidden { .. } => Status::failed_precondition(format!(
                    "{msg}; grant the broker's managed identity a role on the vault with the data actions `Microsoft.KeyVault/vaults/keys/sign/action` and `Microsoft.KeyVault/vaults/certificates/read` (the `tokenbroker signer` role of deploy/azure/keyvault.bicep; see docs/DEPLOY.md), or on a vault that uses access policies, the key permission sign and the certificate permission get"
                )),
                SignerError::NotFound { service, code, .. }
                    if *service == pkcs11::SERVICE && code == pkcs11::TOKEN_NOT_PRESENT =>
                {
                    Status::failed_precondition(format!(
                        "{msg}; check the tenant's credential (module and token: the token's label) and that the token is present (plugged in, its HSM partition reachable); the broker looks for it again at the next fetch"
                    ))
                }
                SignerError::NotFound { service, .. } if *service == pkcs11::SERVICE => {
                    Status::failed_precondition(format!(
                        "{msg}; check the tenant's credential (module, token and key) in the broker configuration"
                    ))
                }
                // `KeyDisabled`, `CertificateDisabled`: there, but switched off.
                SignerError::NotFound { code, .. } if code.ends_with("Disabled") => {
                    Status::failed_precondition(format!(
                        "{msg}; enable the certificate's current version (and its key) in Key Vault, or make an enabled version current"
                    ))
                }
                // There, but outside its validity: the certificate was not renewed in time.
                SignerError::NotFound { code, message, .. }
                    if keyvault::unusable_version(code)
                        || keyvault::outside_validity(code, message) =>
                {
                    Status::failed_precondition(format!(
                        "{msg}; the certificate's key has expired (or is not valid yet): renew the certificate in Key Vault (a new version) and upload its public part to the app"
                    ))
                }
                SignerError::NotFound { .. } => Status::failed_precondition(format!(
                    "{msg}; check the tenant's credential (vault_url and certificate) in the broker configuration"
                )),
                SignerError::Configuration { service, .. } if *service == pkcs11::SERVICE => {
                    Status::failed_precondition(format!(
                        "{msg}; fix the objects on the token (each key with one certificate, paired by CKA_ID) or the tenant's credential (module, token and key)"
                    ))
                }
                SignerError::Configuration { service, .. }
                    if *service == crate::outbound::IDENTITY_ENDPOINT =>
                {
                    Status::failed_precondition(format!("{msg}; {IDENTITY_REDIRECT_HINT}"))
                }
                SignerError::Configuration { code, .. } if code == keyvault::REDIRECT => {
                    Status::failed_precondition(format!(
                        "{msg}; the tenant's credential.vault_url is not the vault's address: name the vault by its own URL (https://NAME.vault.azure.net/, or the sovereign cloud's)"
                    ))
                }
                SignerError::Configuration { .. } => Status::failed_precondition(format!(
                    "{msg}; check the tenant's credential (vault_url, certificate and algorithm) and the certificate's key in Key Vault (an RSA key that may sign)"
                )),
                SignerError::Other { .. } => Status::internal(msg),
            }
        }
        FlowError::Internal(m) => Status::internal(format!("tenant `{tenant}`: {m}")),
    }
}

/// What to fix when the managed identity endpoint's address redirects for good.
const IDENTITY_REDIRECT_HINT: &str = "no Azure managed identity endpoint answers at the address asked (IMDS's 169.254.169.254, App Service's IDENTITY_ENDPOINT): check identity.source against the host the broker runs on, and that nothing on the host or its network answers in the endpoint's place";

fn config_hint(code: Option<u32>) -> &'static str {
    match code {
        Some(90002) => "the tenant id is wrong or in another cloud: check tenant_id and [cloud]",
        Some(700016) | Some(7000229) => {
            "the app is not in this tenant: an administrator of the tenant must consent to the app (or check client_id)"
        }
        Some(7000112) => "the app is disabled in this tenant: an administrator must enable it",
        // AADSTS70021: the code Entra used for all three before it told them apart.
        Some(70021) | Some(700211..=700213) => {
            "the app's federated credential does not match the broker's managed identity token: it needs issuer = the cloud's login host/{the identity's tenant}/v2.0 (https://login.microsoftonline.com/… in the public cloud), subject = the identity's object (principal) id, audience = the tenant's credential.audience (api://AzureADTokenExchange in the public cloud, api://AzureADTokenExchangeUSGov or api://AzureADTokenExchangeChina in those)"
        }
        Some(7002138) => {
            "the app's federated credential matches the broker's managed identity token only when letter case is ignored, and Entra compares the subject exactly: write it (the identity's object id) in the token's case"
        }
        Some(53003) => "a Conditional Access policy blocks this app",
        _ => "fix the tenant's configuration or app registration",
    }
}

/// What to fix when Entra's token endpoint redirects for good (`EntraError::redirect`).
const REDIRECT_HINT: &str = "check the authority host ([cloud] authority_host, else AZURE_AUTHORITY_HOST for a workload identity: Entra's authority of the cloud, https://login.microsoftonline.com in the public one) and any proxy between the broker and it";

/// What to fix when Entra refuses the broker's own workload identity.
fn identity_hint(answer: &EntraError) -> &'static str {
    const FEDERATED: &str = "the broker's workload identity needs a federated credential on its app registration with issuer = the cluster's OIDC issuer, subject = system:serviceaccount:NAMESPACE:NAME of the broker's pod, audience = api://AzureADTokenExchange (…USGov, …China in those clouds; docs/DEPLOY.md)";
    if answer.class == EntraErrorClass::Caller {
        return "Entra will not issue the broker's workload identity a token for Key Vault: check that the vaults are in the cloud of the identity's tenant ([cloud], AZURE_TENANT_ID)";
    }
    if answer.error == "redirect" {
        return REDIRECT_HINT;
    }
    match answer.codes.first() {
        Some(90002) => {
            "AZURE_TENANT_ID names no tenant of this cloud: check the tenant id the pod is given and [cloud]"
        }
        Some(700016) | Some(7000229) => {
            "AZURE_CLIENT_ID names no app in AZURE_TENANT_ID's tenant: check the client id the broker's service account is annotated with (azure.workload.identity/client-id)"
        }
        Some(7002138) => {
            "the federated credential's subject matches the pod's service account only when letter case is ignored, and Entra compares it exactly: write it as system:serviceaccount:NAMESPACE:NAME in the service account's case"
        }
        // AADSTS700211/700212/700213, or a code Entra added since: most likely the same.
        _ => FEDERATED,
    }
}

/// What to fix when Entra refuses the broker's workload identity the token of a tenant's
/// user-assigned identity (credential `managed_identity` on AKS): the identity must trust the
/// pod's service account, as the broker's own workload identity does.
fn federated_identity_hint(answer: &EntraError) -> &'static str {
    if answer.class == EntraErrorClass::Caller {
        return "Entra will not issue the identity a token for the tenant's credential.audience: check it (api://AzureADTokenExchange in the public cloud, …USGov, …China in those)";
    }
    if answer.error == "redirect" {
        return REDIRECT_HINT;
    }
    match answer.codes.first() {
        Some(90002) => {
            "AZURE_TENANT_ID names no tenant of this cloud: check the tenant id the pod is given and [cloud]"
        }
        Some(700016) | Some(7000229) => {
            "no identity with the tenant's credential.client_id is in AZURE_TENANT_ID's tenant: check the client id (the user-assigned identity's, in the tenant of the broker's workload identity)"
        }
        Some(7002138) => {
            "the identity's federated credential matches the pod's service account only when letter case is ignored, and Entra compares it exactly: write its subject as system:serviceaccount:NAMESPACE:NAME in the service account's case"
        }
        // AADSTS700211/700212/700213, or a code Entra added since: most likely the same.
        _ => {
            "the user-assigned identity needs a federated credential trusting the broker's pod, as the broker's workload identity does: issuer = the cluster's OIDC issuer, subject = system:serviceaccount:NAMESPACE:NAME of the broker's pod, audience = api://AzureADTokenExchange (…USGov, …China in those clouds; docs/DEPLOY.md)"
        }
    }
}

/// The retry hint passed on for an upstream's failure: its own `Retry-After`, which comes
/// from the network (a proxy may send years), held to the bound of the broker's own retries.
fn upstream_hint(retry_after: Option<Duration>) -> Duration {
    retry_after
        .unwrap_or(Duration::from_secs(5))
        .min(MAX_RETRY_AFTER)
}

/// `s` with `after` as its `retry-after`, in whole seconds rounded up (at least one): a
/// hint cut down to its whole seconds sends a client back before the wait is over, to be
/// refused again (a caller 2.5 s from its next token told 2).
fn with_retry(mut s: Status, after: Option<Duration>) -> Status {
    if let Some(d) = after
        && let Ok(v) = (d.as_secs() + u64::from(d.subsec_nanos() > 0))
            .max(1)
            .to_string()
            .parse()
    {
        s.metadata_mut().insert(RETRY_AFTER_KEY, v);
    }
    s
}

/// Codes as strings, for logs and audit.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::signer::keyvault;

    fn signer_status(e: SignerError) -> Status {
        to_status(&BrokerError::Upstream {
            tenant: "contoso".into(),
            source: Arc::new(FlowError::Signer(e)),
            remembered: None,
        })
    }

    #[test]
    fn a_retry_hint_is_never_shorter_than_the_wait_it_stands_for() {
        let hint = |d: Duration| {
            let s = access_status(&AccessError::RateLimited {
                caller: "a".into(),
                retry_after: d,
            });
            s.metadata()
                .get(RETRY_AFTER_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        for (wait, told) in [
            (Duration::from_millis(2500), "3"),
            (Duration::from_millis(1), "1"),
            (Duration::ZERO, "1"),
            (Duration::from_secs(2), "2"),
            (Duration::from_nanos(2_000_000_001), "3"),
        ] {
            assert_eq!(hint(wait).as_deref(), Some(told), "{wait:?}");
        }
        // The failed-token limit's message tells the same wait as its hint.
        let s = access_status(&AccessError::Unauthenticated(AuthnError::Jwt(
            JwtError::TooManyFailures {
                retry_after: Duration::from_millis(2500),
            },
        )));
        assert!(s.message().contains("retry after 3s"), "{s:?}");
        assert_eq!(s.metadata().get(RETRY_AFTER_KEY).unwrap(), "3");
    }

    #[test]
    fn a_remembered_failures_time_left_is_told_in_hours_minutes_and_seconds() {
        for (secs, told) in [
            (1, "1s"),
            (59, "59s"),
            (60, "1m 0s"),
            (250, "4m 10s"),
            (3600, "1h 0m 0s"),
            (86_400, "24h 0m 0s"),
        ] {
            assert_eq!(span_text(Duration::from_secs(secs)), told);
        }
    }

    #[test]
    fn an_upstreams_retry_hint_is_passed_on_up_to_the_bound_of_the_brokers_own_retries() {
        use crate::entra::{EntraError, EntraErrorClass};
        let failures = |hint: Duration| {
            [
                FlowError::Entra(EntraError {
                    class: EntraErrorClass::Retryable,
                    status: 429,
                    error: "temporarily_unavailable".into(),
                    codes: vec![],
                    description: "d".into(),
                    correlation_id: None,
                    trace_id: None,
                    retry_after: Some(hint),
                }),
                FlowError::Identity(IdentityError::Unavailable {
                    message: "m".into(),
                    retry_after: Some(hint),
                }),
                FlowError::Signer(SignerError::Unavailable {
                    service: keyvault::SERVICE,
                    message: "m".into(),
                    retry_after: Some(hint),
                    throttled: false,
                }),
            ]
        };
        for (hint, told) in [
            (Duration::from_secs(60), "60"),
            (MAX_RETRY_AFTER, "300"),
            // A proxy's `Retry-After: 1000000000`: decades.
            (Duration::from_secs(1_000_000_000), "300"),
        ] {
            for e in failures(hint) {
                let s = to_status(&BrokerError::Upstream {
                    tenant: "contoso".into(),
                    source: Arc::new(e),
                    remembered: None,
                });
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert_eq!(
                    s.metadata()
                        .get(RETRY_AFTER_KEY)
                        .map(|v| v.to_str().unwrap()),
                    Some(told),
                    "{s:?}"
                );
            }
        }
    }

    #[test]
    fn a_federated_subject_matching_only_without_case_is_a_failed_precondition_naming_case() {
        let s = to_status(&BrokerError::Upstream {
            tenant: "contoso".into(),
            source: Arc::new(FlowError::Entra(EntraError {
                class: crate::entra::classify(400, "invalid_client", &[7002138]),
                status: 400,
                error: "invalid_client".into(),
                codes: vec![7002138],
                description: "AADSTS7002138: No matching federated identity record found for presented assertion subject 'A'. The subject matches with case-insensitive comparison, but not with case-sensitive comparison.".into(),
                correlation_id: None,
                trace_id: None,
                retry_after: None,
            })),
            remembered: None,
        });
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("letter case"), "{s:?}");
    }

    #[test]
    fn the_brokers_own_identity_refused_is_told_what_to_fix_by_entras_code() {
        for (status, error, code, fix) in [
            (
                401,
                "invalid_client",
                700213,
                "needs a federated credential",
            ),
            // A code Entra added since: most likely the federated credential too.
            (
                401,
                "invalid_client",
                7009999,
                "needs a federated credential",
            ),
            (401, "invalid_client", 7002138, "letter case"),
            (400, "unauthorized_client", 700016, "AZURE_CLIENT_ID"),
            (400, "invalid_request", 90002, "AZURE_TENANT_ID"),
            (400, "invalid_resource", 500011, "token for Key Vault"),
        ] {
            let body = format!(
                r#"{{"error":"{error}","error_description":"AADSTS{code}: Entra's words.","error_codes":[{code}]}}"#
            );
            let answer = crate::entra::answer_to_sdk(status, body.as_bytes(), None);
            let s = signer_status(SignerError::IdentityRefused(Box::new(answer)));
            assert_eq!(s.code(), Code::FailedPrecondition, "{code}: {s:?}");
            assert!(
                s.message()
                    .contains(&format!("AADSTS{code}: Entra's words")),
                "{s:?}"
            );
            assert!(s.message().contains(fix), "{code}: {s:?}");
        }
    }

    #[test]
    fn a_tenants_managed_identity_refused_is_a_failed_precondition_with_the_fix() {
        let status = |e: IdentityError| {
            to_status(&BrokerError::Upstream {
                tenant: "contoso-federated".into(),
                source: Arc::new(FlowError::Identity(e)),
                remembered: None,
            })
        };
        let s = status(IdentityError::NotAssigned {
            client_id: "i".into(),
            status: 400,
            message: "Identity not found".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains("assign the user-assigned identity"),
            "{s:?}"
        );
        for (status_code, error, code, fix) in [
            (
                401,
                "invalid_client",
                700213,
                "needs a federated credential trusting the broker's pod",
            ),
            (
                401,
                "invalid_client",
                7009999,
                "needs a federated credential trusting the broker's pod",
            ),
            (401, "invalid_client", 7002138, "letter case"),
            (400, "unauthorized_client", 700016, "credential.client_id"),
            (400, "invalid_request", 90002, "AZURE_TENANT_ID"),
            (400, "invalid_resource", 500011, "credential.audience"),
        ] {
            let body = format!(
                r#"{{"error":"{error}","error_description":"AADSTS{code}: Entra's words.","error_codes":[{code}]}}"#
            );
            let answer = crate::entra::answer_to_sdk(status_code, body.as_bytes(), None);
            let s = status(IdentityError::Refused {
                client_id: "i".into(),
                answer: Box::new(answer),
            });
            assert_eq!(s.code(), Code::FailedPrecondition, "{code}: {s:?}");
            assert!(
                s.message()
                    .contains(&format!("AADSTS{code}: Entra's words")),
                "{s:?}"
            );
            assert!(s.message().contains(fix), "{code}: {s:?}");
        }
        // Entra's older code for the app's federated credential not matching the identity's
        // token: the same fix as the codes that name issuer, audience and subject.
        let s = to_status(&BrokerError::Upstream {
            tenant: "contoso-federated".into(),
            source: Arc::new(FlowError::Entra(EntraError {
                class: EntraErrorClass::Configuration,
                status: 401,
                error: "invalid_client".into(),
                codes: vec![70021],
                description: "AADSTS70021: No matching federated identity record found for presented assertion.".into(),
                correlation_id: None,
                trace_id: None,
                retry_after: None,
            })),
            remembered: None,
        });
        assert!(
            s.message()
                .contains("subject = the identity's object (principal) id"),
            "{s:?}"
        );
    }

    #[test]
    fn a_credential_that_cannot_work_as_configured_is_a_failed_precondition_with_the_fix() {
        for (service, code, fix) in [
            (
                keyvault::SERVICE,
                "BadParameter",
                "vault_url, certificate and algorithm",
            ),
            (pkcs11::SERVICE, "CertificateAmbiguous", "paired by CKA_ID"),
        ] {
            let s = signer_status(SignerError::Configuration {
                service,
                code: code.into(),
                message: "m".into(),
            });
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains(code), "{}", s.message());
            assert!(s.message().contains(fix), "{}", s.message());
            assert!(s.metadata().get(RETRY_AFTER_KEY).is_none());
        }
    }
}
