//! `tokenbroker serve` and `check-config` as processes: a setup mistake stops it at start
//! with what to fix, or is warned of.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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

/// What App Service sets in the process: its managed identity endpoint and the header that
/// proves a request comes from the app.
const APP_SERVICE_ENDPOINT: &str = "http://127.0.0.1:9/msi/token";
const APP_SERVICE_HEADER: &str = "d1e2a3d4-not-to-be-printed";

/// The broker binary running `args` with App Service's variables and nothing else that picks
/// a managed identity.
fn on_app_service(args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenbroker"));
    cmd.args(args)
        .env("IDENTITY_ENDPOINT", APP_SERVICE_ENDPOINT)
        .env("IDENTITY_HEADER", APP_SERVICE_HEADER);
    for var in [
        "TOKENBROKER_IDENTITY_SOURCE",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn imds_configured_where_app_services_variables_are_set_is_warned_of_naming_what_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [identity]\nsource = \"imds\"\n\n\
         [tenants.contoso]\ntenant_id = \"22222222-2222-2222-2222-222222222222\"\n\
         client_id = \"33333333-3333-3333-3333-333333333333\"\n\
         credential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"contoso-app\" }\n",
    )
    .unwrap();
    let warning = "identity.source: is imds, but the process has IDENTITY_ENDPOINT and IDENTITY_HEADER set, so azure_identity's managed identity credential (which reads them itself, whatever identity.source says) gets the broker's token from the App Service endpoint IDENTITY_ENDPOINT names, not from IMDS";

    // check-config: valid (exit 0), with the warning and the fix.
    let out = on_app_service(&["check-config".as_ref(), config.as_os_str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("no warning: {stdout}"));
    assert!(line.starts_with("WARNING: line 9: "), "{line}");
    assert!(line.contains("write source = \"app_service\""), "{line}");
    assert!(!stdout.contains(APP_SERVICE_HEADER), "{stdout}");

    // serve: the same warning in its log at start, and it serves.
    let mut serve = on_app_service(&["serve".as_ref(), "--config".as_ref(), config.as_os_str()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let serving = l.contains("admin listener");
            seen.push(l);
            if serving {
                break;
            }
        }
        seen
    });
    let log = log.join().unwrap();
    crate::helpers::terminate(&mut serve);
    assert!(log.iter().any(|l| l.contains(warning)), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("admin listener")), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains(APP_SERVICE_HEADER)),
        "{log:#?}"
    );
}
