//! `tokenbroker serve` as a process: a setup mistake stops it at start with what to fix.

use std::process::Command;

#[test]
fn serve_without_the_workload_identity_variables_names_them_and_what_sets_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [tenants.contoso]\ntenant_id = \"22222222-2222-2222-2222-222222222222\"\n\
         client_id = \"33333333-3333-3333-3333-333333333333\"\n\
         credential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"contoso-app\" }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOKENBROKER_IDENTITY_SOURCE", "workload_identity")
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .env_remove("TOKENBROKER_IDENTITY_CLIENT_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // EX_CONFIG, as for any configuration problem.
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(
            "TOKENBROKER_IDENTITY_SOURCE: workload identity needs AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE in the broker's environment, and none is set"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("azure.workload.identity/use: \"true\"")
            && stderr.contains("azure.workload.identity/client-id"),
        "{stderr}"
    );
    assert!(!stderr.contains("no tenant ID specified"), "{stderr}");
}
