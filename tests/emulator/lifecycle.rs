//! Start, endpoints file, loopback only, config parsing, shutdown.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;
use tokenbroker::emulator::{Emulator, EmulatorConfig, EmulatorError, StartOptions};

use crate::common::*;

#[tokio::test]
async fn endpoints_file_and_shutdown() {
    let env = start_demo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/endpoints.json");
    env.ep().write_atomically(&path).unwrap();
    let written: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let keys = [
        "identity_endpoint",
        "identity_header",
        "imds_endpoint",
        "key_vault_url",
        "authority_host",
        "ca_cert",
        "admin_url",
    ];
    assert_eq!(written.as_object().unwrap().len(), keys.len());
    for k in keys {
        assert!(written[k].as_str().is_some_and(|v| !v.is_empty()), "{k}");
    }
    assert!(
        written["identity_endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(
        written["identity_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/msi/token")
    );
    assert!(
        written["key_vault_url"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    assert!(
        written["authority_host"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    assert!(
        written["admin_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    let ca = std::path::Path::new(written["ca_cert"].as_str().unwrap());
    assert!(ca.is_absolute());
    assert_eq!(std::fs::read_to_string(ca).unwrap(), env.emu.ca_pem());
    assert!(env.emu.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    let admin = env.ep().admin_url.clone();
    let Env { emu, http, .. } = env;
    emu.shutdown().await;
    assert!(
        http.get(format!("{admin}/healthz")).send().await.is_err(),
        "listeners are closed"
    );
}

#[tokio::test]
async fn identity_header_is_random_per_start() {
    let a = start_demo().await;
    let b = start_demo().await;
    assert_ne!(a.ep().identity_header, b.ep().identity_header);
}

#[tokio::test]
async fn refuses_non_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StartOptions::new(dir.path().join("ca.pem"));
    opts.bind_ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let err = Emulator::start(EmulatorConfig::demo(), opts)
        .await
        .unwrap_err();
    assert!(matches!(err, EmulatorError::NotLoopback(_)), "{err}");
}

#[tokio::test]
async fn parses_the_documented_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emulator.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let config = EmulatorConfig::from_toml_file(&path).unwrap();
    assert_eq!(config.identities.len(), 1);
    assert_eq!(
        config.tenants[1].apps[0].client_id, config.tenants[0].apps[0].client_id,
        "multi-tenant app"
    );
    let env = start(config).await;
    let token = env.mi_token(VAULT_RESOURCE, None).await;
    let resp = env
        .https
        .get(format!(
            "{}/certificates/app-cert?api-version=7.5",
            env.ep().key_vault_url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let bad = EXAMPLE.replace("tb-example/app-cert", "tb-example/missing");
    assert!(EmulatorConfig::from_toml_str(&bad).is_err());
    // Token lifetimes are bounded, so the emulator's own time arithmetic cannot overflow.
    let mut huge = EmulatorConfig::demo();
    huge.tenants[0].apps[0].token_lifetime_secs = [3600, u64::MAX];
    let err = huge.validate().unwrap_err().to_string();
    assert!(err.contains("token_lifetime_secs"), "{err}");
}

const EXAMPLE: &str = r#"
[[identities]]
name = "broker"
client_id = "11111111-0000-4000-8000-000000000001"
object_id = "11111111-0000-4000-8000-000000000002"
system_assigned = true
tenant_id = "22222222-0000-4000-8000-000000000001"

[[vaults]]
name = "tb-example"

[[vaults.certificates]]
name = "app-cert"
key_size = 2048
versions = 2

[[vaults.role_assignments]]
principal = "11111111-0000-4000-8000-000000000002"
role = "Key Vault Crypto User"
scope = "keys/app-cert"

[[vaults.role_assignments]]
principal = "11111111-0000-4000-8000-000000000002"
role = "Key Vault Certificate User"
scope = "certificates/app-cert"

[[tenants]]
tenant_id = "22222222-0000-4000-8000-000000000001"
domain = "home.onmicrosoft.com"
resources = ["https://graph.microsoft.com"]

[[tenants.apps]]
client_id = "33333333-0000-4000-8000-000000000001"
display_name = "multi-tenant daemon"
certificates = ["tb-example/app-cert"]
roles = ["Files.Read.All"]
token_lifetime_secs = [3600, 5400]
federated_credentials = [{ issuer = "{authority_host}/22222222-0000-4000-8000-000000000001/v2.0", subject = "11111111-0000-4000-8000-000000000002" }]

[[tenants]]
tenant_id = "22222222-0000-4000-8000-000000000002"
resources = ["https://graph.microsoft.com"]

[[tenants.apps]]
client_id = "33333333-0000-4000-8000-000000000001"
certificates = ["tb-example/app-cert"]
"#;
