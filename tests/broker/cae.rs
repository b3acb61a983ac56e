//! Continuous access evaluation end to end: a tenant opted in with `client_capabilities`
//! gets CAE tokens (`xms_cc`), and a caller answers a resource's claims challenge through
//! GetToken's `claims`.

use base64::Engine;
use serde_json::{Value, json};
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::{GetTokenRequest, GetTokenResponse, TokenSource};
use tonic::Code;

use crate::helpers::*;

/// The demo estate, the Contoso app's CAE tokens living a day as Entra's do.
fn estate() -> EmulatorConfig {
    let mut emu = EmulatorConfig::demo();
    for t in &mut emu.tenants {
        for a in &mut t.apps {
            a.cae_token_lifetime_secs = Some([86400, 86400]);
        }
    }
    emu
}

/// Contoso opted in; the audit trail to `audit` when given.
fn opted_in(audit: Option<String>) -> impl FnOnce(String) -> String {
    move |toml: String| {
        let toml = toml.replacen(
            "[tenants.contoso]\n",
            "[tenants.contoso]\nclient_capabilities = [\"cp1\"]\n",
            1,
        );
        match audit {
            Some(file) => toml
                .lines()
                .map(|l| {
                    if l.starts_with("file = ") {
                        format!("file = {file:?}")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            None => toml,
        }
    }
}

/// The claims Entra last received for the app `client_id` in `tenant_id`.
async fn claims_seen(stack: &Stack, tenant_id: &str, client_id: &str) -> Value {
    stack.counters().await["claims"][format!("{tenant_id}/{client_id}")].clone()
}

async fn challenged(stack: &Stack, claims: &str) -> Result<GetTokenResponse, tonic::Status> {
    stack
        .client()
        .await
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            claims: claims.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A claims challenge as Microsoft Graph words it in `WWW-Authenticate` (standard base64).
fn graph_challenge(nbf: u64) -> (Value, String) {
    let claims = json!({"access_token": {"nbf": {"essential": true, "value": nbf.to_string()}}});
    let encoded = base64::engine::general_purpose::STANDARD.encode(claims.to_string());
    (claims, encoded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_opted_in_gets_cae_tokens_and_one_not_opted_in_sends_no_claims() {
    let stack = Stack::start_with(estate(), opted_in(None)).await;
    let t = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(claims(&t.access_token)["xms_cc"], json!(["cp1"]));
    assert_eq!(
        claims_seen(&stack, demo::CONTOSO_TENANT, demo::CONTOSO_APP).await,
        json!({"access_token": {"xms_cc": {"values": ["cp1"]}}})
    );
    // A CAE token lives a day, and is refreshed at Entra's hint (half of it).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = t.expires_at.unwrap().seconds - now;
    assert!((86000..=86400).contains(&left), "{left}");
    let refresh = t.refresh_at.unwrap().seconds - now;
    assert!((42800..=43200).contains(&refresh), "{refresh}");
    // A caller that needs the token for a long job may ask for hours of it: the cached one.
    let long = stack
        .client()
        .await
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            min_validity: Some(prost_types::Duration {
                seconds: 8 * 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.access_token, t.access_token);
    assert_eq!(long.source, TokenSource::Cache as i32);
    // Fabrikam is not opted in: no claims parameter at all, an ordinary token.
    let f = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(claims(&f.access_token)["xms_cc"], Value::Null);
    assert_eq!(
        claims_seen(&stack, demo::FABRIKAM_TENANT, demo::FABRIKAM_APP).await,
        Value::Null
    );
    assert_eq!(
        stack
            .exchanges(demo::FABRIKAM_TENANT, demo::FABRIKAM_APP)
            .await,
        1
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_challenge_gets_a_new_token_with_its_claims_that_later_callers_share() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let stack = Stack::start_with(
        estate(),
        opted_in(Some(audit.to_string_lossy().into_owned())),
    )
    .await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    // Graph refused `first`: the caller passes the challenge's claims as they came.
    let (claims_asked, encoded) = graph_challenge(1_700_000_000);
    let fresh = challenged(&stack, &encoded).await.unwrap();
    assert_eq!(fresh.source, TokenSource::Exchange as i32);
    assert_ne!(fresh.access_token, first.access_token);
    assert_eq!(claims(&fresh.access_token)["xms_cc"], json!(["cp1"]));
    // Entra saw the challenge's claims merged with the tenant's capability.
    let mut merged = claims_asked.clone();
    merged["access_token"]["xms_cc"] = json!({"values": ["cp1"]});
    assert_eq!(
        claims_seen(&stack, demo::CONTOSO_TENANT, demo::CONTOSO_APP).await,
        merged
    );
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2
    );
    // A second caller gets the new token from the cache.
    let later = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(later.source, TokenSource::Cache as i32);
    assert_eq!(later.access_token, fresh.access_token);
    // Within the forced-refresh interval (30 s), more challenges (the same one as JSON, or
    // another) cost no exchange: the cached token answers, said to be cached.
    let (_, other) = graph_challenge(1_700_000_999);
    for claims in [claims_asked.to_string(), other] {
        let t = challenged(&stack, &claims).await.unwrap();
        assert_eq!(t.source, TokenSource::Cache as i32);
        assert_eq!(t.access_token, fresh.access_token);
    }
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2
    );
    stack.stop().await;
    // The audit trail tells which requests passed claims, by their digest only.
    let text = std::fs::read_to_string(&audit).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let digests: Vec<&str> = records
        .iter()
        .filter_map(|r| r["claims_digest"].as_str())
        .collect();
    assert_eq!(digests.len(), 3, "{text}");
    assert!(digests.iter().all(|d| d.starts_with("sha256:")), "{text}");
    // Records of different threads may be written out of order: two of one challenge
    // (however encoded), one of the other.
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for d in &digests {
        *counts.entry(d).or_default() += 1;
    }
    let mut counts: Vec<usize> = counts.into_values().collect();
    counts.sort();
    assert_eq!(counts, [1, 2], "{text}");
    assert!(
        !text.contains("1700000000"),
        "the claims themselves: {text}"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.get("claims_digest").is_none())
            .count(),
        2,
        "requests without claims carry no digest: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_claims_are_invalid_argument_and_nothing_is_fetched() {
    let stack = Stack::start_with(estate(), opted_in(None)).await;
    let too_long = format!(
        "{{\"access_token\":{{\"x\":\"{}\"}}}}",
        "a".repeat(tokenbroker::claims::MAX_CLAIMS_LEN)
    );
    for (claims, why) in [
        ("not a challenge!", "neither a JSON object nor base64"),
        ("{\"access_token\":", "not valid JSON"),
        ("[\"cp1\"]", "neither a JSON object nor base64"),
        ("{}", "names no claims"),
        (too_long.as_str(), "at most 8192 bytes"),
    ] {
        let e = challenged(&stack, claims).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{claims:.40}: {e:?}");
        assert!(e.message().contains("claims"), "{e:?}");
        assert!(e.message().contains(why), "{claims:.40}: {e:?}");
    }
    assert_eq!(stack.route_total("entra.token").await, 0);
    assert_eq!(stack.route_total("keyvault.sign").await, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_passes_a_claims_challenge() {
    let stack = Stack::start_with(estate(), opted_in(None)).await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let addr = format!("http://{}", stack.addr);
    let run = |claims: String| {
        let addr = addr.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
                .args([
                    "token", "--addr", &addr, "--tenant", "contoso", "--scope", GRAPH,
                ])
                .args(["--json", "--claims", &claims])
                .output()
                .await
                .unwrap()
        }
    };
    let (asked, encoded) = graph_challenge(1_700_000_000);
    let out = run(encoded).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["source"], "EXCHANGE");
    assert_ne!(printed["access_token"], first.access_token.as_str());
    let seen = claims_seen(&stack, demo::CONTOSO_TENANT, demo::CONTOSO_APP).await;
    assert_eq!(seen["access_token"]["nbf"], asked["access_token"]["nbf"]);
    assert_eq!(seen["access_token"]["xms_cc"], json!({"values": ["cp1"]}));
    // Not a challenge: the broker's INVALID_ARGUMENT, exit status 1.
    let out = run("not a challenge!".into()).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("claims"), "{said}");
    stack.stop().await;
}

/// Graph's sign-in log with `token`: the status, and the claims of a CAE challenge if any.
async fn call_graph(stack: &Stack, token: &str) -> (u16, Option<String>) {
    let r = stack
        .http
        .get(format!(
            "{}/graph/v1.0/auditLogs/signIns",
            stack.emulator().endpoints().authority_host
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.contains("error=\"insufficient_claims\""))
        .and_then(|v| v.split("claims=\"").nth(1))
        .and_then(|v| v.split('"').next())
        .map(str::to_owned);
    (r.status().as_u16(), challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_apps_cae_token_is_refused_at_once_and_the_challenge_answered_with_entras_refusal()
 {
    let stack = Stack::start_with(estate(), opted_in(None)).await;
    let cae = stack.get("contoso", GRAPH).await.unwrap();
    let ordinary = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(call_graph(&stack, &cae.access_token).await, (200, None));
    assert_eq!(
        call_graph(&stack, &ordinary.access_token).await,
        (200, None)
    );
    // Both apps disabled: Graph refuses the CAE token at once, with a claims challenge; the
    // ordinary token keeps working until it expires.
    for (tenant, app) in [
        (demo::CONTOSO_TENANT, demo::CONTOSO_APP),
        (demo::FABRIKAM_TENANT, demo::FABRIKAM_APP),
    ] {
        stack
            .admin_post(&format!("/tenants/{tenant}/apps/{app}/disable"), json!({}))
            .await;
    }
    let (status, challenge) = call_graph(&stack, &cae.access_token).await;
    assert_eq!(status, 401);
    let challenge = challenge.expect("a claims challenge");
    assert_eq!(
        call_graph(&stack, &ordinary.access_token).await,
        (200, None)
    );
    // The caller passes the challenge on: Entra refuses the disabled app, and says so.
    let e = challenged(&stack, &challenge).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("AADSTS7000112"), "{e:?}");
    let seen = claims_seen(&stack, demo::CONTOSO_TENANT, demo::CONTOSO_APP).await;
    assert!(seen["access_token"]["nbf"]["essential"] == true, "{seen}");
    assert_eq!(seen["access_token"]["xms_cc"], json!({"values": ["cp1"]}));
    // Enabled again, the next challenge gets a token Graph takes.
    stack
        .admin_post(
            &format!(
                "/tenants/{}/apps/{}/enable",
                demo::CONTOSO_TENANT,
                demo::CONTOSO_APP
            ),
            json!({}),
        )
        .await;
    let fresh = challenged(&stack, &challenge).await;
    // Within the forced-refresh interval of the refused fetch, the cached token answers;
    // either way the token now served works.
    let token = match fresh {
        Ok(t) => t.access_token,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(call_graph(&stack, &token).await, (200, None));
    stack.stop().await;
}
