//! `check-config --online` (`tokenbroker::probe`): each tenant tried against the emulator.

use std::path::PathBuf;
use std::time::Duration;

use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::probe::{self, Outcome};
use tonic::Code;

use crate::helpers::{GRAPH, emulator_with_config};

/// The emulator with the demo estate, and a broker configuration for it (`edit`ed).
async fn estate(edit: impl FnOnce(String) -> String) -> (Emulator, PathBuf, tempfile::TempDir) {
    emulator_with_config(EmulatorConfig::demo(), edit).await
}

fn config(path: &std::path::Path) -> tokenbroker::config::Config {
    tokenbroker::config::Config::load(path, &|_| None).unwrap()
}

async fn check(
    path: &std::path::Path,
    tenants: &[&str],
    scopes: &[&str],
) -> Vec<probe::TenantCheck> {
    let config = config(path);
    let up = tokenbroker::server::upstreams(&config).unwrap();
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    probe::check(
        &config,
        up,
        &own(tenants),
        &own(scopes),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_is_tried_and_a_broken_one_is_named_with_its_fix() {
    let (_emulator, path, _dir) = estate(|t| {
        t.replace(
            "certificate = \"fabrikam-app\"",
            "certificate = \"no-such-cert\"",
        )
    })
    .await;
    let checks = check(&path, &[], &[GRAPH]).await;
    let by_name = |n: &str| checks.iter().find(|c| c.tenant == n).unwrap();
    // Every tenant of the configuration, in the order of their names.
    let names: Vec<&str> = checks.iter().map(|c| c.tenant.as_str()).collect();
    assert_eq!(names, ["contoso", "contoso-federated", "fabrikam"]);
    match &by_name("contoso").outcome {
        Outcome::Ok {
            valid_for,
            certificate_ends_in,
            ..
        } => {
            assert!(valid_for.as_secs() > 3000, "{valid_for:?}");
            // The demo certificate is valid for a year.
            let days = certificate_ends_in.unwrap() / 86_400.0;
            assert!((300.0..=366.0).contains(&days), "{days}");
        }
        other => panic!("contoso: {other:?}"),
    }
    // A federated credential signs nothing: no certificate to report.
    assert!(matches!(
        by_name("contoso-federated").outcome,
        Outcome::Ok {
            certificate_ends_in: None,
            ..
        }
    ));
    match &by_name("fabrikam").outcome {
        Outcome::Failed { code, message } => {
            assert_eq!(*code, Code::FailedPrecondition);
            assert!(message.contains("no-such-cert"), "{message}");
            assert!(message.contains("vault_url and certificate"), "{message}");
        }
        other => panic!("fabrikam: {other:?}"),
    }
    assert!(by_name("contoso").scopes == [GRAPH]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_scopes_the_pre_warm_scopes_are_tried_and_tenants_without_any_are_not() {
    let (_emulator, path, _dir) = estate(|t| {
        format!(
            "{t}\n[resilience]\nprewarm = [{{ tenant = \"fabrikam\", scopes = [\"{GRAPH}\"] }}]\n"
        )
    })
    .await;
    let checks = check(&path, &["contoso", "fabrikam"], &[]).await;
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0].tenant, "contoso");
    assert!(matches!(checks[0].outcome, Outcome::NotTried));
    assert!(checks[0].scopes.is_empty());
    assert_eq!(checks[1].tenant, "fabrikam");
    assert!(checks[1].outcome.is_ok(), "{:?}", checks[1].outcome);
    assert_eq!(checks[1].scopes, [GRAPH]);

    // A tenant not in the configuration is an error that lists the ones there are.
    let config = config(&path);
    let up = tokenbroker::server::upstreams(&config).unwrap();
    let err = probe::check(
        &config,
        up,
        &["nope".to_owned()],
        &[],
        Duration::from_secs(5),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`nope`") && err.contains("contoso, contoso-federated, fabrikam"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_a_line_per_tenant_and_fails_unless_all_got_a_token() {
    let (_emulator, path, _dir) = estate(|t| {
        t.replace(
            "certificate = \"fabrikam-app\"",
            "certificate = \"no-such-cert\"",
        )
    })
    .await;
    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"));
        cmd.arg("check-config")
            .arg(&path)
            .arg("--online")
            .args(args);
        cmd.kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
                .await
                .expect("check-config --online finished")
                .unwrap();
            (
                out.status.code(),
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
            )
        }
    };
    let (code, out, err) = run(&["--scope", GRAPH]).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with("configuration OK; each tenant tried:"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("contoso ") && lines[1].contains(" ok "),
        "{out}"
    );
    assert!(
        lines[3].starts_with("fabrikam ") && lines[3].contains("FAILED"),
        "{out}"
    );
    assert!(
        lines[3].contains("FailedPrecondition") && lines[3].contains("no-such-cert"),
        "{out}"
    );
    assert_eq!(lines[4], "2 ok, 1 failed, 0 not tried", "{out}");
    // Fingerprints only: no token (a JWT starts with `eyJ`) in the report or the log.
    assert!(!out.contains("eyJ") && !err.contains("eyJ"), "{out}\n{err}");

    let (code, out, err) = run(&["--scope", GRAPH, "--tenant", "contoso"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.ends_with("\n1 ok, 0 failed, 0 not tried\n"), "{out}");

    let (code, out, err) = run(&["--scope", GRAPH, "--json"]).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], 2, "{out}");
    assert_eq!(report["failed"], 1, "{out}");
    assert_eq!(report["tenants"][2]["tenant"], "fabrikam");
    assert_eq!(report["tenants"][2]["code"], "FailedPrecondition");
    assert!(!out.contains("eyJ"), "{out}");

    let (code, _, err) = run(&["--tenant", "nope"]).await;
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("`nope` is not in the configuration"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_upstream_does_not_answer_in_time_is_reported_as_such() {
    let (emulator, path, _dir) = estate(|t| t).await;
    let http = crate::helpers::http_client(std::path::Path::new(&emulator.endpoints().ca_cert));
    let r = http
        .post(format!("{}/faults", emulator.endpoints().admin_url))
        .json(&serde_json::json!({"route": "entra.token", "latency_ms": 5000, "count": 100}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let config = config(&path);
    let up = tokenbroker::server::upstreams(&config).unwrap();
    let checks = probe::check(
        &config,
        up,
        &["fabrikam".to_owned()],
        &[GRAPH.to_owned()],
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert!(
        matches!(checks[0].outcome, Outcome::TimedOut(d) if d == Duration::from_millis(500)),
        "{:?}",
        checks[0].outcome
    );
    assert!(
        probe::report(&checks)
            .contains("FAILED      https://graph.microsoft.com/.default: no answer within 0.5 s")
    );
}
