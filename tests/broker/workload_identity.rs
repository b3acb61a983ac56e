//! The broker's own identity as AKS workload identity, end to end: a projected service
//! account token of a (loopback) cluster OIDC issuer, exchanged at the emulated Entra for a
//! Key Vault token of the app registration that trusts the cluster's service account, which
//! then signs the tenants' assertions in the emulated vault.

use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::emulator::VaultRole;
use tokenbroker::emulator::config::{AppConfig, FederatedCredentialConfig, RoleAssignmentConfig};
use tokenbroker::proto::TokenSource;
use tonic::Code;

use crate::cluster_issuer::{ClusterIssuer, EXCHANGE_AUDIENCE, SERVICE_ACCOUNT};
use crate::helpers::*;

/// The broker's app registration, trusted by the cluster's service account.
const BROKER_APP: &str = "c0c0c0c0-a994-4000-8000-000000000a04";
/// Its service principal in Contoso, the vault's tenant.
const BROKER_SP: &str = "c0c0c0c0-a995-4000-8000-000000000a05";

/// The demo estate with the broker's app registration in Contoso trusting `issuer`'s
/// `SERVICE_ACCOUNT`, Key Vault known in Contoso, and the vault's roles held by that app's
/// service principal alone (the host's managed identities hold none).
fn estate(issuer: &str) -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    let contoso = &mut config.tenants[0];
    contoso.resources.push("https://vault.azure.net".into());
    contoso.apps.push(AppConfig {
        client_id: BROKER_APP.into(),
        display_name: Some("tokenbroker (workload identity)".into()),
        certificates: Vec::new(),
        roles: Vec::new(),
        enabled: true,
        federated_credentials: vec![FederatedCredentialConfig {
            issuer: issuer.into(),
            subject: SERVICE_ACCOUNT.into(),
            audience: EXCHANGE_AUDIENCE.into(),
        }],
        token_lifetime_secs: [3600, 5400],
        cae_token_lifetime_secs: None,
        service_principal_id: Some(BROKER_SP.into()),
    });
    config.vaults[0].role_assignments = [VaultRole::CryptoUser, VaultRole::CertificateUser]
        .into_iter()
        .map(|role| RoleAssignmentConfig {
            principal: BROKER_SP.into(),
            role,
            scope: "*".into(),
        })
        .collect();
    config
}

/// The generated configuration with `identity.source = "workload_identity"` (its cloud stays
/// the emulator's custom authority host) and `extra` appended.
fn workload_identity(extra: &'static str) -> impl FnOnce(String) -> String {
    move |toml| {
        let (start, end) = (
            toml.find("[identity]").unwrap(),
            toml.find("[cloud]").unwrap(),
        );
        format!(
            "{}[identity]\nsource = \"workload_identity\"\n\n{}{extra}",
            &toml[..start],
            &toml[end..]
        )
    }
}

/// What the webhook sets in the pod, with the token in `token_file`. Its
/// `AZURE_AUTHORITY_HOST` is the public cloud's, as on a public-cloud cluster: the configured
/// cloud (the emulator's authority host) must win.
fn pod_env(token_file: std::path::PathBuf) -> impl Fn(&str) -> Option<String> + Sync {
    move |k: &str| match k {
        "AZURE_CLIENT_ID" => Some(BROKER_APP.into()),
        "AZURE_TENANT_ID" => Some(demo::CONTOSO_TENANT.into()),
        "AZURE_FEDERATED_TOKEN_FILE" => Some(token_file.display().to_string()),
        "AZURE_AUTHORITY_HOST" => Some("https://login.microsoftonline.com/".into()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_identity_is_a_workload_identity_serves_tokens() {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    std::fs::write(&token_file, cluster.token(SERVICE_ACCOUNT)).unwrap();
    let env = pod_env(token_file);
    let stack = Stack::start_with_env(estate(cluster.issuer()), workload_identity(""), &env).await;

    let first = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(first.source, TokenSource::Exchange as i32);
    assert_eq!(first.tenant_id, demo::CONTOSO_TENANT);
    assert_eq!(claims(&first.access_token)["appid"], demo::CONTOSO_APP);
    // The vault signed for the broker's app (its only role holder), whose Key Vault token
    // came from the service account token: no managed identity was asked.
    assert_eq!(stack.total_signs().await, 1);
    let counters = stack.counters().await;
    let identity = &counters["exchanges"][format!("{}/{BROKER_APP}", demo::CONTOSO_TENANT)];
    assert_eq!(
        (identity["total"].as_u64(), identity["success"].as_u64()),
        (Some(1), Some(1)),
        "{counters}"
    );
    assert!(
        counters["mi_tokens"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{counters}"
    );
    assert!(cluster.jwks_fetches() >= 1);

    // Another tenant, signed with the same identity's token, kept by the broker.
    let other = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(other.tenant_id, demo::FABRIKAM_TENANT);
    assert_eq!(stack.total_signs().await, 2);
    assert_eq!(stack.exchanges(demo::CONTOSO_TENANT, BROKER_APP).await, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_the_app_does_not_trust_is_refused_with_entras_reason() {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    let other = "system:serviceaccount:tokenbroker:not-the-broker";
    let token = cluster.token(other);
    std::fs::write(&token_file, &token).unwrap();
    let env = pod_env(token_file);
    let stack = Stack::start_with_env(
        estate(cluster.issuer()),
        workload_identity("\n[resilience]\nretry_budget_secs = 1\n"),
        &env,
    )
    .await;

    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    // A configuration to fix, not an outage to wait out: Entra's refusal, and the fix.
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let m = s.message();
    assert!(m.contains("AADSTS700213"), "{m}");
    assert!(
        m.contains("federated credential on its app registration"),
        "{m}"
    );
    assert!(m.contains(other), "{m}");
    // Entra's own words, not the SDK's failure to read them.
    assert!(!m.contains("invalid type"), "{m}");
    assert!(
        !m.contains(&token),
        "the service account token is never told: {m}"
    );
    assert_eq!(stack.total_signs().await, 0);
    assert!(stack.exchanges(demo::CONTOSO_TENANT, BROKER_APP).await >= 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_again_for_each_identity_token_not_kept_for_minutes() {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    // A token Entra refuses first (a subject the app does not trust).
    std::fs::write(
        &token_file,
        cluster.token("system:serviceaccount:tokenbroker:not-the-broker"),
    )
    .unwrap();
    let env = pod_env(token_file.clone());
    let stack = Stack::start_with_env(
        estate(cluster.issuer()),
        workload_identity("\n[resilience]\nretry_budget_secs = 1\n"),
        &env,
    )
    .await;
    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    // The kubelet replaces the file (a new projected token, swapped in whole), as it does
    // well before the old one expires: with a projected token's shortest life (10 minutes,
    // replaced at 8), a file read kept for 10 minutes is sent after it expired.
    let next = pod.path().join("next-token");
    std::fs::write(&next, cluster.token(SERVICE_ACCOUNT)).unwrap();
    std::fs::rename(&next, &token_file).unwrap();
    // Once the identity's failure is no longer shared with callers (2 s) and the refusal
    // forgotten (SIGHUP), the next identity token is asked with the file as it is now.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    stack.broker.forget_refusals().await;
    let token = stack
        .get("contoso", GRAPH)
        .await
        .expect("served with the token file's new token");
    assert_eq!(token.tenant_id, demo::CONTOSO_TENANT);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_trusted_only_in_other_letter_case_is_told_to_write_the_subject_in_its_case()
 {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    // The app's federated credential names `SERVICE_ACCOUNT`; the pod's namespace differs
    // from it in case alone.
    let pods = "system:serviceaccount:TokenBroker:tokenbroker";
    std::fs::write(&token_file, cluster.token(pods)).unwrap();
    let env = pod_env(token_file);
    let stack = Stack::start_with_env(estate(cluster.issuer()), workload_identity(""), &env).await;

    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let m = s.message();
    assert!(m.contains("AADSTS7002138"), "{m}");
    assert!(m.contains(pods), "{m}");
    // What to write, not the catch-all of a federated credential that does not match.
    assert!(
        m.contains("matches the pod's service account only when letter case is ignored"),
        "{m}"
    );
    assert!(!m.contains("needs a federated credential"), "{m}");
    // Remembered like other configuration errors: asked of Entra once.
    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(stack.exchanges(demo::CONTOSO_TENANT, BROKER_APP).await, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_outage_on_the_identitys_own_request_is_unavailable_and_not_remembered() {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    std::fs::write(&token_file, cluster.token(SERVICE_ACCOUNT)).unwrap();
    let env = pod_env(token_file);
    // The default attempts (3) and retry budget (10 s).
    let stack = Stack::start_with_env(estate(cluster.issuer()), workload_identity(""), &env).await;
    // Entra's page for an outage, with a code the broker does not list, on Contoso's token
    // endpoint: there only the identity's own request goes (Fabrikam's exchange is at
    // Fabrikam's).
    let fault = stack
        .admin_post(
            "/faults",
            serde_json::json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 100, "fail": {"status": 500, "body": {
                "error": "server_error",
                "error_description": "AADSTS50000: There was an error issuing a token or an issue with our sign-in service.\r\nTrace ID: 2f8c6b1e-0c6f-4b5a-9e3d-000000000001\r\nCorrelation ID: 2f8c6b1e-0c6f-4b5a-9e3d-000000000002",
                "error_codes": [50000],
                "correlation_id": "2f8c6b1e-0c6f-4b5a-9e3d-000000000002",
            }}}),
        )
        .await;

    let s = stack.get("fabrikam", GRAPH).await.unwrap_err();
    // An outage to wait out, not a configuration to fix, told in Entra's words: not as the
    // end of the retry budget, which the credential's own retries used to spend.
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let m = s.message();
    assert!(
        m.contains("Entra ID answered 500 server_error (AADSTS50000)"),
        "{m}"
    );
    assert!(m.contains("2f8c6b1e-0c6f-4b5a-9e3d-000000000002"), "{m}");
    assert!(!m.contains("retry budget"), "{m}");
    // Retried by the broker alone: at most one request to Entra per attempt of its own (the
    // credential retries nothing itself, and shares a failure with the attempts that follow
    // within 2 s, so usually one in all).
    let faults = stack.faults().await;
    let hits = faults["faults"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == fault["id"])
        .map(|f| f["hits"].as_u64().unwrap());
    assert!(matches!(hits, Some(1..=3)), "{faults}");

    // Not remembered as the configuration's: once Entra is back, a request is served as
    // soon as the outage's short hold-off is over.
    stack.clear_faults().await;
    let t = stack.get_after_hold_off("fabrikam", GRAPH).await;
    assert_eq!(t.tenant_id, demo::FABRIKAM_TENANT);
    assert_eq!(stack.exchanges(demo::CONTOSO_TENANT, BROKER_APP).await, 1);
    stack.stop().await;
}

/// `estate` with the exchange audience known to Contoso's Entra (a v1.0 resource there), so
/// the broker's workload identity can ask for a user-assigned identity's token for it.
fn exchange_estate(issuer: &str) -> EmulatorConfig {
    let mut config = estate(issuer);
    config.tenants[0].resources.push(EXCHANGE_AUDIENCE.into());
    config
}

/// A tenant of Fabrikam's app whose credential is the user-assigned identity `client_id`,
/// whose token the broker's workload identity gets from Entra (AKS: the identity trusts the
/// pod's service account).
fn federated_tenant(name: &str, client_id: &str) -> String {
    format!(
        "\n[tenants.{name}]\ntenant_id = \"{}\"\nclient_id = \"{}\"\n\
         credential = {{ type = \"managed_identity\", client_id = \"{client_id}\" }}\n",
        demo::FABRIKAM_TENANT,
        demo::FABRIKAM_APP,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_identity_entra_refuses_the_workload_identity_is_a_failed_precondition_with_the_fix()
 {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    std::fs::write(&token_file, cluster.token(SERVICE_ACCOUNT)).unwrap();
    let env = pod_env(token_file);
    let stranger = "0badc0de-0000-4000-8000-000000000bad";
    // Contoso's app trusts no cluster; `stranger` is no app of Contoso's.
    let tenants =
        federated_tenant("untrusted", demo::CONTOSO_APP) + &federated_tenant("stranger", stranger);
    let stack = Stack::start_with_env(
        exchange_estate(cluster.issuer()),
        |toml| format!("{}{tenants}", workload_identity("")(toml)),
        &env,
    )
    .await;

    for (tenant, code, fix) in [
        (
            "untrusted",
            "AADSTS700211",
            "the user-assigned identity needs a federated credential trusting the broker's pod",
        ),
        (
            "stranger",
            "AADSTS700016",
            "no identity with the tenant's credential.client_id is in AZURE_TENANT_ID's tenant",
        ),
    ] {
        let s = stack.get(tenant, GRAPH).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{tenant}: {s:?}");
        let m = s.message();
        assert!(m.contains(code), "{m}");
        assert!(m.contains(fix), "{m}");
        assert!(m.contains("correlation id"), "{m}");
        assert!(s.metadata().get("retry-after").is_none(), "{s:?}");
    }
    // Remembered like other configuration errors: Entra is not asked again meanwhile.
    let asked = stack
        .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
        .await;
    assert_eq!(asked, 1);
    let s = stack.get("untrusted", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        asked
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_identity_through_workload_identity_survives_an_entra_outage_unremembered() {
    let cluster = ClusterIssuer::start().await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("azure-identity-token");
    std::fs::write(&token_file, cluster.token(SERVICE_ACCOUNT)).unwrap();
    let env = pod_env(token_file);
    // The broker's own app stands for the user-assigned identity (it trusts the pod's
    // service account); Fabrikam's app trusts its token for the exchange audience.
    let mut estate = exchange_estate(cluster.issuer());
    estate.tenants[1].apps[0].federated_credentials = vec![FederatedCredentialConfig {
        issuer: format!("https://sts.windows.net/{}/", demo::CONTOSO_TENANT),
        subject: BROKER_SP.into(),
        audience: EXCHANGE_AUDIENCE.into(),
    }];
    let tenant = federated_tenant("fabrikam-federated", BROKER_APP);
    let stack = Stack::start_with_env(
        estate,
        |toml| format!("{}{tenant}", workload_identity("")(toml)),
        &env,
    )
    .await;
    // An outage of Contoso's token endpoint, where only the identity's token is asked for.
    stack
        .admin_post(
            "/faults",
            serde_json::json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 100, "fail": {"status": 503, "body": {
                "error": "temporarily_unavailable",
                "error_description": "AADSTS50000: There was an error issuing a token.",
                "error_codes": [50000],
                "correlation_id": "2f8c6b1e-0c6f-4b5a-9e3d-000000000003",
            }}}),
        )
        .await;
    let s = stack.get("fabrikam-federated", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let m = s.message();
    assert!(
        m.contains("Entra ID answered 503 temporarily_unavailable (AADSTS50000)"),
        "{m}"
    );
    assert!(m.contains("2f8c6b1e-0c6f-4b5a-9e3d-000000000003"), "{m}");

    // Not remembered: once Entra is back, the next request is served.
    stack.clear_faults().await;
    let t = stack.get_after_hold_off("fabrikam-federated", GRAPH).await;
    assert_eq!(t.tenant_id, demo::FABRIKAM_TENANT);
    assert_eq!(claims(&t.access_token)["appid"], demo::FABRIKAM_APP);
    // No Key Vault: the identity's token is the assertion.
    assert_eq!(stack.total_signs().await, 0);
    stack.stop().await;
}
