//! End-to-end tests of the broker through its gRPC API, against the local Azure emulator.

mod cae;
mod cluster_issuer;
mod helpers;
mod probe;
mod startup;
mod workload_identity;

use std::collections::HashSet;

use helpers::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;
use tokenbroker::proto::{GetTokenRequest, TokenSource};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_token_verifies_then_is_served_from_cache() {
    let stack = Stack::start().await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(first.source, TokenSource::Exchange as i32);
    assert_eq!(first.tenant_id, demo::CONTOSO_TENANT);
    assert_eq!(first.client_id, demo::CONTOSO_APP);
    assert_eq!(first.token_type, "Bearer");
    assert_eq!(first.scopes, vec![GRAPH.to_string()]);
    let (exp, refresh) = (
        first.expires_at.unwrap().seconds,
        first.refresh_at.unwrap().seconds,
    );
    assert!(refresh < exp);

    // The token verifies against the emulated Entra's JWKS, with the right claims.
    let jwks = stack.jwks(demo::CONTOSO_TENANT).await;
    let header = jsonwebtoken::decode_header(&first.access_token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&["https://graph.microsoft.com"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &first.access_token,
        &DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["tid"], demo::CONTOSO_TENANT);
    assert_eq!(data.claims["appid"], demo::CONTOSO_APP);
    // The broker counts the lifetime from when it sent the request: never past the token's
    // own `exp`, earlier by the exchange's time (a second boundary crossed meanwhile).
    let claimed = data.claims["exp"].as_i64().unwrap();
    assert!(
        (exp..=exp + 5).contains(&claimed),
        "{exp} against {claimed}"
    );

    let signs = stack.total_signs().await;
    let exchanges = stack
        .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
        .await;
    assert_eq!((signs, exchanges), (1, 1));

    let second = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(second.source, TokenSource::Cache as i32);
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(stack.total_signs().await, 1, "a cache hit must not sign");
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        1
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_requests_cause_one_sign_and_one_exchange() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let calls = (0..1000).map(|_| {
        let mut c = client.clone();
        async move {
            c.get_token(GetTokenRequest {
                tenant: "fabrikam".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().access_token)
        }
    });
    let tokens = futures::future::join_all(calls).await;
    let distinct: HashSet<String> = tokens.into_iter().map(|t| t.unwrap()).collect();
    assert_eq!(distinct.len(), 1, "all callers share one token");
    let stats = stack.broker.stats();
    assert_eq!(
        stack
            .broker
            .upstream_stats()
            .exchanges
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(stats.hits.get() + stats.misses.get(), 1000);
    assert_eq!(stack.total_signs().await, 1);
    assert_eq!(
        stack
            .exchanges(demo::FABRIKAM_TENANT, demo::FABRIKAM_APP)
            .await,
        1
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_over_one_vault_costs_it_one_challenge_per_client() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    // Keys of two tenants whose certificates are in the same vault, asked for together at
    // start: each certificate read and each sign is a first request of its SDK client.
    let calls = ["contoso", "fabrikam"]
        .into_iter()
        .cycle()
        .take(20)
        .map(|tenant| {
            let mut c = client.clone();
            async move {
                c.get_token(GetTokenRequest {
                    tenant: tenant.into(),
                    scopes: vec![GRAPH.into()],
                    ..Default::default()
                })
                .await
                .map(drop)
            }
        });
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    let counters = stack.counters().await;
    for route in ["keyvault.certificate", "keyvault.sign"] {
        // Two requests made, and one challenge (an unauthenticated probe answered 401) per
        // SDK client, however many keys were asked for at once.
        assert_eq!(
            (
                &counters["routes"][route]["success"],
                &counters["routes"][route]["failure"]
            ),
            (&json!(2), &json!(1)),
            "{route}: {counters}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_is_signed_with_its_own_key_only() {
    let stack = Stack::start().await;
    stack.get("contoso", GRAPH).await.unwrap();
    stack.get("fabrikam", GRAPH).await.unwrap();
    let counters = stack.counters().await;
    let signs = counters["sign"].as_object().unwrap();
    let contoso: u64 = signs
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{}/contoso-app/", demo::VAULT)))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    let fabrikam: u64 = signs
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{}/fabrikam-app/", demo::VAULT)))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!((contoso, fabrikam), (1, 1), "{signs:?}");
    assert_eq!(signs.len(), 2, "no other key was used: {signs:?}");
    // And each assertion names its own tenant's token endpoint and app.
    let seen = stack.assertions.lock().unwrap().clone();
    let auds: HashSet<(String, String)> = seen
        .iter()
        .map(|a| {
            let c = claims(a);
            (
                c["aud"].as_str().unwrap().to_owned(),
                c["iss"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let authority = &stack.emulator().endpoints().authority_host;
    assert!(auds.contains(&(
        format!("{authority}/{}/oauth2/v2.0/token", demo::CONTOSO_TENANT),
        demo::CONTOSO_APP.to_string()
    )));
    assert!(auds.contains(&(
        format!("{authority}/{}/oauth2/v2.0/token", demo::FABRIKAM_TENANT),
        demo::FABRIKAM_APP.to_string()
    )));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assertion_verifies_with_the_certificate_public_key() {
    let stack = Stack::start().await;
    stack.get("contoso", GRAPH).await.unwrap();
    let assertion = stack.assertions.lock().unwrap()[0].clone();
    let der = stack.certificate_der("contoso-app").await;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let spki = cert.public_key().subject_public_key.data.to_vec();

    let header = jsonwebtoken::decode_header(&assertion).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    use base64::Engine;
    use sha1::Digest;
    let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&der));
    assert_eq!(header.x5t.as_deref(), Some(x5t.as_str()));

    let endpoint = format!(
        "{}/{}/oauth2/v2.0/token",
        stack.emulator().endpoints().authority_host,
        demo::CONTOSO_TENANT
    );
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[endpoint.as_str()]);
    v.set_issuer(&[demo::CONTOSO_APP]);
    v.sub = Some(demo::CONTOSO_APP.to_string());
    v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    v.validate_nbf = true;
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &assertion,
        &DecodingKey::from_rsa_der(&spki),
        &v,
    )
    .expect("assertion signature and claims verify with the certificate's public key");
    let c = data.claims;
    let (iat, nbf, exp) = (
        c["iat"].as_u64().unwrap(),
        c["nbf"].as_u64().unwrap(),
        c["exp"].as_u64().unwrap(),
    );
    assert!(nbf <= iat + 1 && exp > nbf && exp - nbf <= 600, "{c}");
    assert!(uuid::Uuid::parse_str(c["jti"].as_str().unwrap()).is_ok());
    stack.stop().await;
}

fn assert_status(
    r: Result<tokenbroker::proto::GetTokenResponse, tonic::Status>,
    code: Code,
    needles: &[&str],
) -> tonic::Status {
    let s = match r {
        Ok(_) => panic!("expected {code:?}, got a token"),
        Err(s) => s,
    };
    assert_eq!(s.code(), code, "{}", s.message());
    for n in needles {
        assert!(
            s.message().contains(n),
            "message {:?} should mention {n:?}",
            s.message()
        );
    }
    assert!(
        !s.message().contains("eyJ"),
        "no token or assertion in messages: {}",
        s.message()
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_name_the_field_or_the_tenant() {
    let stack = Stack::start().await;
    let mut c = stack.client().await;
    let r = c
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    assert_status(r, Code::InvalidArgument, &["scopes"]);
    let r = c
        .get_token(GetTokenRequest {
            tenant: "".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    assert_status(r, Code::InvalidArgument, &["tenant"]);
    let r = c
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            min_validity: Some(prost_types::Duration {
                seconds: 86401,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    assert_status(
        r,
        Code::InvalidArgument,
        &["min_validity", "at most 86400s"],
    );
    // Nanos of a second or more: no protobuf Duration.
    let r = c
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            min_validity: Some(prost_types::Duration {
                seconds: 60,
                nanos: 1_000_000_000,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    assert_status(r, Code::InvalidArgument, &["min_validity", "nanos"]);
    assert_status(
        stack.get("nope", GRAPH).await,
        Code::NotFound,
        &["nope", "not configured"],
    );
    // A scope Entra refuses (no /.default) is the caller's to fix.
    assert_status(
        stack
            .get("contoso", "https://graph.microsoft.com/User.Read")
            .await,
        Code::InvalidArgument,
        &["AADSTS1002012", "correlation id"],
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_configuration_failures_are_failed_precondition_with_code_and_correlation() {
    // contoso is configured with fabrikam's certificate (not registered on contoso's app),
    // and fabrikam with an app id that does not exist in its tenant.
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |t| {
        t.replacen(
            "certificate = \"contoso-app\"",
            "certificate = \"fabrikam-app\"",
            1,
        )
        .replace(demo::FABRIKAM_APP, "0000aaaa-0000-4000-8000-000000000000")
    })
    .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &["AADSTS700027", "correlation id", "upload the certificate"],
    );
    assert!(s.message().contains("tenant `contoso`"));
    assert_status(
        stack.get("fabrikam", GRAPH).await,
        Code::FailedPrecondition,
        &["AADSTS700016", "consent"],
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_app_is_failed_precondition() {
    let stack = Stack::start().await;
    stack
        .admin_post(
            &format!(
                "/tenants/{}/apps/{}/disable",
                demo::CONTOSO_TENANT,
                demo::CONTOSO_APP
            ),
            json!({}),
        )
        .await;
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &["AADSTS7000112", "disabled"],
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lifetime_beyond_a_day_is_cached_for_a_day_at_most() {
    // A year: a misbehaving upstream, or a proxy rewriting responses.
    let mut emu = tokenbroker::emulator::EmulatorConfig::demo();
    for t in &mut emu.tenants {
        for a in &mut t.apps {
            a.token_lifetime_secs = [365 * 86_400; 2];
        }
    }
    let stack = Stack::start_with(emu, |t| t).await;
    let unix_secs = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    // The lifetime counts from when the request was sent, which lies between these two
    // (whole seconds: the request may cross a second boundary).
    let before = unix_secs();
    let t = stack.get("contoso", GRAPH).await.unwrap();
    let after = unix_secs();
    let expires = t.expires_at.unwrap().seconds;
    assert!(
        expires >= before + 86_400 && expires <= after + 86_400,
        "{expires} vs {before}..{after}"
    );
    assert!(t.refresh_at.unwrap().seconds < expires);
    let again = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(again.source, TokenSource::Cache as i32);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_refusals_are_failed_precondition_with_the_fix() {
    // The broker's identity has no role on the vault's keys (certificate reads only).
    let mut emu = tokenbroker::emulator::EmulatorConfig::demo();
    emu.vaults[0]
        .role_assignments
        .retain(|r| !format!("{:?}", r.role).contains("Crypto"));
    let stack = Stack::start_with(emu, |t| {
        t.replace(
            "certificate = \"fabrikam-app\"",
            "certificate = \"no-such-cert\"",
        )
    })
    .await;
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &[
            "Key Vault",
            "ForbiddenByRbac",
            "keys/sign/action",
            "certificates/read",
            "x-ms-request-id",
        ],
    );
    assert_status(
        stack.get("fabrikam", GRAPH).await,
        Code::FailedPrecondition,
        &["no-such-cert", "vault_url and certificate"],
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_key_vault_refuses_is_a_failed_precondition_remembered_like_one() {
    let stack = Stack::start().await;
    // 400 BadParameter, as for a key whose type does not fit the configured algorithm.
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 100, "fail": {"status": 400}}),
        )
        .await;
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &[
            "BadParameter",
            "HTTP 400",
            "vault_url, certificate and algorithm",
        ],
    );
    assert_eq!(stack.route_total("keyvault.sign").await, 1, "not retried");
    // Remembered for the negative cache's time: asking again does not reach Key Vault.
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &["BadParameter"],
    );
    assert_eq!(stack.route_total("keyvault.sign").await, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vaults_refusals_other_than_a_missing_role_name_their_inner_code_and_own_fix() {
    // contoso's app again, under another name: a key of its own in the cache.
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!(
            "{toml}\n[tenants.contoso-expired]\ntenant_id = \"{}\"\nclient_id = \"{}\"\n{}\n",
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
            toml.lines()
                .find(|l| l.starts_with("credential = ") && l.contains("contoso-app"))
                .unwrap(),
        )
    })
    .await;
    // Key Vault's 403 is `Forbidden` whatever the cause; its `innererror.code` tells them
    // apart: a disabled key, or the vault's firewall. Neither is fixed by a role.
    for (tenant, inner, message, fix) in [
        (
            "contoso",
            "KeyDisabled",
            "Operation sign is not allowed on a disabled key.",
            "enable",
        ),
        // As Key Vault words an expired secret's (`SecretExpired`).
        (
            "contoso-expired",
            "KeyExpired",
            "Operation sign is not allowed on an expired key.",
            "renew",
        ),
        (
            "fabrikam",
            "ForbiddenByFirewall",
            "Client address is not authorized and caller is not a trusted service.",
            "firewall",
        ),
    ] {
        stack
            .admin_post(
                "/faults",
                json!({"route": "keyvault.sign", "count": 100, "fail": {"status": 403, "body":
                    {"error": {"code": "Forbidden", "message": message, "innererror": {"code": inner}}}}}),
            )
            .await;
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::FailedPrecondition,
            &[inner, message, fix],
        );
        assert!(
            !s.message()
                .contains("grant the broker's managed identity a role"),
            "{inner}: {}",
            s.message()
        );
        stack.clear_faults().await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_validity_is_told_as_expired_not_as_a_missing_role() {
    // Valid for a day, then the vault's clock two days on: Key Vault refuses to sign with
    // the version (its own 403, no fault injected), which no role fixes.
    let mut config = tokenbroker::emulator::EmulatorConfig::demo();
    for v in &mut config.vaults {
        for c in &mut v.certificates {
            c.validity_days = 1;
        }
    }
    let stack = Stack::start_with(config, |t| t).await;
    stack
        .admin_post("/clock/advance", json!({"seconds": 2 * 24 * 3600}))
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &["KeyExpired", "renew"],
    );
    assert!(
        !s.message()
            .contains("grant the broker's managed identity a role"),
        "{}",
        s.message()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outages_are_unavailable_with_a_retry_hint() {
    let stack = Stack::start().await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 5, "fail": {"status": 503}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["Entra ID", "retry"],
    );
    assert!(s.metadata().get("retry-after").is_some());
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 50, "fail": {"status": 429, "retry_after": 1}}),
        )
        .await;
    let s = assert_status(
        stack.get("fabrikam", GRAPH).await,
        Code::Unavailable,
        &["Key Vault"],
    );
    assert!(s.metadata().get("retry-after").is_some());
    stack.stop().await;
}

/// Everything logged in this test binary, at every level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_certificate_near_its_end_is_a_warning_and_each_ones_end_a_metric() {
    let logs = captured_logs();
    let mut emu = tokenbroker::emulator::EmulatorConfig::demo();
    for c in &mut emu.vaults[0].certificates {
        if c.name == "fabrikam-app" {
            c.validity_days = 10;
        }
    }
    let stack = Stack::start_with(emu, |t| t).await;
    stack.get("contoso", GRAPH).await.unwrap();
    stack.get("fabrikam", GRAPH).await.unwrap();
    let text = stack.metrics().await;
    let days = |tenant: &str| {
        let series = format!("tokenbroker_certificate_expiry_seconds{{tenant=\"{tenant}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map(|v| v.parse::<f64>().unwrap() / 86_400.0)
    };
    let contoso = days("contoso").expect("contoso's certificate end");
    assert!((364.0..=365.0).contains(&contoso), "{contoso}");
    let fabrikam = days("fabrikam").expect("fabrikam's certificate end");
    assert!((9.0..=10.0).contains(&fabrikam), "{fabrikam}");
    // A tenant without a certificate (federated managed identity) has no such series.
    assert_eq!(days("contoso-federated"), None);
    stack.stop().await;

    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let warnings: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("the signing certificate expires soon"))
        .collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("fabrikam-app") && l.contains("days_left")),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|l| l.contains("contoso-app")),
        "{warnings:?}"
    );
}

fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let writer = move || Capture(buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_writer(writer)
            .try_init();
        buf
    })
}

struct Capture(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_contains_a_token_or_an_assertion() {
    let logs = captured_logs();
    let stack = Stack::start().await;
    let a = stack.get("contoso", GRAPH).await.unwrap();
    let b = stack.get("fabrikam", GRAPH).await.unwrap();
    stack.get("contoso", GRAPH).await.unwrap();
    // A failure path too (Entra error body, correlation ids).
    stack
        .get("contoso", "https://graph.microsoft.com/User.Read")
        .await
        .unwrap_err();
    let assertions = stack.assertions.lock().unwrap().clone();
    assert!(assertions.len() >= 3);
    stack.stop().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("token obtained"), "logging was captured");
    for secret in [&a.access_token, &b.access_token]
        .into_iter()
        .chain(assertions.iter())
    {
        // Any 40-character run of a token's signature would be a leak.
        let sig = secret.rsplit('.').next().unwrap();
        assert!(
            !text.contains(&sig[..40]),
            "a token or assertion reached the logs"
        );
        assert!(!text.contains(secret.as_str()));
    }
    // The fingerprint is what identifies a token in logs.
    let fp = tokenbroker::sensitive::fingerprint(a.access_token.as_bytes());
    assert!(
        text.contains(fp.as_str()),
        "the served token's fingerprint is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_validity_and_forced_refresh() {
    let stack = Stack::start().await;
    let mut c = stack.client().await;
    let req = |min: Option<i64>, force: bool| GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        min_validity: min.map(|s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        }),
        force_refresh: force,
        ..Default::default()
    };
    let first = c.get_token(req(None, false)).await.unwrap().into_inner();
    // A minimum validity the cached token meets is served from cache.
    let cached = c
        .get_token(req(Some(600), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.source, TokenSource::Cache as i32);
    assert_eq!(cached.access_token, first.access_token);
    // A forced refresh gets a fresh exchange...
    let forced = c.get_token(req(None, true)).await.unwrap().into_inner();
    assert_eq!(forced.source, TokenSource::Exchange as i32);
    assert_ne!(forced.access_token, first.access_token);
    // ...but only once per interval: the next one is served from cache.
    let again = c.get_token(req(None, true)).await.unwrap().into_inner();
    assert_eq!(again.source, TokenSource::Cache as i32);
    assert_eq!(again.access_token, forced.access_token);
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2
    );
    // Negative durations are refused, naming the field.
    let e = c.get_token(req(Some(-5), false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("min_validity"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_managed_identity_token_is_fetched_once_for_all_key_vault_calls() {
    let stack = Stack::start().await;
    // Certificate reads and signs for two tenants: four Key Vault calls through two SDK
    // clients, all with the broker's one managed identity token for Key Vault.
    let calls = (0..20).map(|i| {
        let stack = &stack;
        async move {
            let tenant = if i % 2 == 0 { "contoso" } else { "fabrikam" };
            stack.get(tenant, GRAPH).await.unwrap()
        }
    });
    futures::future::join_all(calls).await;
    let counters = stack.counters().await;
    assert_eq!(
        counters["mi_tokens"]["broker"].as_u64(),
        Some(1),
        "{}",
        counters["mi_tokens"]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_identity_token_key_vault_refuses_is_replaced_and_the_call_retried() {
    let stack = Stack::start_full(
        tokenbroker::emulator::EmulatorConfig::demo(),
        |t| t,
        Some(tokenbroker::clock::ManualClock::new()),
        |e| e,
    )
    .await;
    stack.get("contoso", GRAPH).await.unwrap();
    // A day and more on: Key Vault finds the cached identity token expired (AKV10013) while
    // the broker, by its host's clock, still holds it fresh (skew, revocation, CAE alike).
    stack.advance(std::time::Duration::from_secs(90_000)).await;
    let fresh = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(fresh.source, TokenSource::Exchange as i32);
    let counters = stack.counters().await;
    assert_eq!(
        counters["mi_tokens"]["broker"].as_u64(),
        Some(2),
        "{}",
        counters["mi_tokens"]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_app_trusts_a_managed_identity_gets_tokens_without_key_vault() {
    // `contoso-federated`: the Contoso app, trusting the host's user-assigned identity
    // `broker-fic` through a federated credential (the dev configuration).
    let stack = Stack::start().await;
    let first = stack.get("contoso-federated", GRAPH).await.unwrap();
    assert_eq!(first.source, TokenSource::Exchange as i32);
    assert_eq!(first.tenant_id, demo::CONTOSO_TENANT);
    assert_eq!(first.client_id, demo::CONTOSO_APP);
    let token = claims(&first.access_token);
    assert_eq!(token["tid"], demo::CONTOSO_TENANT);
    assert_eq!(token["appid"], demo::CONTOSO_APP);
    // The assertion Entra got is the identity's token for the token-exchange audience.
    let seen = stack.assertions.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let assertion = claims(&seen[0]);
    assert_eq!(assertion["sub"], demo::FIC_MI_OBJECT_ID);
    assert_eq!(assertion["aud"], "api://AzureADTokenExchange");
    assert!(
        assertion["iss"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{}/v2.0", demo::CONTOSO_TENANT)),
        "{assertion}"
    );
    // A refresh presents the same (cached) identity token again; Key Vault is never asked.
    let again = stack
        .force_refresh("contoso-federated", GRAPH)
        .await
        .unwrap();
    assert_eq!(again.source, TokenSource::Exchange as i32);
    assert_ne!(again.access_token, first.access_token);
    let counters = stack.counters().await;
    assert_eq!(counters["mi_tokens"]["broker-fic"].as_u64(), Some(1));
    assert_eq!(stack.total_signs().await, 0, "{}", counters["sign"]);
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_a_matching_federated_credential_is_a_clear_failed_precondition() {
    // The Fabrikam app trusts no identity; the broker presents `broker-fic` anyway.
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!(
            "{toml}\n[tenants.fabrikam-federated]\ntenant_id = \"{}\"\nclient_id = \"{}\"\n\
             credential = {{ type = \"managed_identity\", client_id = \"{}\" }}\n",
            demo::FABRIKAM_TENANT,
            demo::FABRIKAM_APP,
            demo::FIC_MI_CLIENT_ID
        )
    })
    .await;
    let s = stack.get("fabrikam-federated", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let m = s.message();
    assert!(m.contains("AADSTS700211"), "{m}");
    assert!(m.contains("federated credential"), "{m}");
    assert!(m.contains("object (principal) id"), "{m}");
    assert!(m.contains("credential.audience"), "{m}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_the_host_does_not_have_is_a_failed_precondition_remembered_like_one() {
    let stranger = "0badc0de-0000-4000-8000-000000000bad";
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!(
            "{toml}\n[tenants.contoso-stranger]\ntenant_id = \"{}\"\nclient_id = \"{}\"\n\
             credential = {{ type = \"managed_identity\", client_id = \"{stranger}\" }}\n",
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
        )
    })
    .await;
    // IMDS's 400 "Identity not found": the host's setup, not an outage.
    let s = stack.get("contoso-stranger", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let m = s.message();
    assert!(
        m.contains(&format!(
            "the managed identity endpoint refused identity {stranger} (HTTP 400)"
        )),
        "{m}"
    );
    assert!(
        m.contains("assign the user-assigned identity to this host"),
        "{m}"
    );
    assert!(s.metadata().get("retry-after").is_none(), "{s:?}");
    // Remembered: the endpoint is not asked again within the negative period.
    let asked = stack.route_total("identity.imds").await;
    let s = stack.get("contoso-stranger", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(stack.route_total("identity.imds").await, asked);
    assert_eq!(stack.total_signs().await, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_own_identity_the_host_does_not_have_is_a_failed_precondition_remembered_like_one()
 {
    let stranger = "0badc0de-0000-4000-8000-00000000b0b0";
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        toml.replacen(
            "[identity]\n",
            &format!("[identity]\nclient_id = \"{stranger}\"\n"),
            1,
        )
    })
    .await;
    // IMDS's 400 "Identity not found" to the broker's own identity: every Key Vault tenant
    // fails until the host is set up; not an outage to retry.
    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let m = s.message();
    assert!(
        m.contains(
            "the managed identity endpoint refused the broker's identity for Key Vault (HTTP 400)"
        ),
        "{m}"
    );
    assert!(m.contains("correct identity.client_id"), "{m}");
    assert!(s.metadata().get("retry-after").is_none(), "{s:?}");
    // Remembered: the endpoint is not asked again within the negative period.
    let asked = stack.route_total("identity.imds").await;
    let s = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(stack.route_total("identity.imds").await, asked);
    assert_eq!(stack.total_signs().await, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_identity_endpoint_outage_is_unavailable_and_not_remembered() {
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!("{toml}\n[resilience]\nretry_budget_secs = 1\n")
    })
    .await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "identity.imds", "count": 1000, "fail": {"status": 503}}),
        )
        .await;
    // Each attempt is one request to IMDS (no SDK retries inside it): worth retrying.
    let s = stack.get("contoso-federated", GRAPH).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("managed identity token unavailable"),
        "{s:?}"
    );
    stack.clear_faults().await;
    let t = stack.get_after_hold_off("contoso-federated", GRAPH).await;
    assert_eq!(t.client_id, demo::CONTOSO_APP);
    stack.stop().await;
}

/// What a `tenant`'s token request is told when `route` answers every request with a
/// redirect of `status` to a sign-in page whose query carries a secret.
async fn redirected(route: &str, status: u16, tenant: &str) -> tonic::Status {
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!("{toml}\n[resilience]\nretry_budget_secs = 1\n")
    })
    .await;
    stack
        .admin_post(
            "/faults",
            json!({"route": route, "count": 1000, "fail": {"status": status, "headers":
                {"location": "https://sso.example.net:8443/login?session=s3cr3t"}}}),
        )
        .await;
    let s = stack.get(tenant, GRAPH).await.unwrap_err();
    stack.stop().await;
    assert!(
        s.message().contains(&format!(
            "HTTP {status} redirect to https://sso.example.net:8443/login, not followed"
        )),
        "{route} {status}: {}",
        s.message()
    );
    assert!(!s.message().contains("s3cr3t"), "{}", s.message());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_in_key_vaults_place_is_named_and_a_permanent_one_is_the_configurations() {
    // A temporary one (a proxy's sign-in): retried, as a page in Key Vault's place is.
    let s = redirected("keyvault.sign", 302, "contoso").await;
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    for status in [301, 308] {
        let s = redirected("keyvault.certificate", status, "fabrikam").await;
        assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
        assert!(s.message().contains("vault_url"), "{}", s.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_in_the_identity_endpoints_place_is_named_and_a_permanent_one_is_the_configurations()
 {
    // The broker's own identity (for Key Vault) and a tenant's managed identity alike.
    for tenant in ["contoso", "contoso-federated"] {
        let s = redirected("identity.imds", 307, tenant).await;
        assert_eq!(s.code(), Code::Unavailable, "{tenant}: {}", s.message());
        let s = redirected("identity.imds", 308, tenant).await;
        assert_eq!(
            s.code(),
            Code::FailedPrecondition,
            "{tenant}: {}",
            s.message()
        );
        assert!(
            s.message().contains("identity.source"),
            "{tenant}: {}",
            s.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_identity_endpoint_failing_is_named_and_spares_key_vaults_breaker() {
    identity_outage_spares_key_vault(
        json!({"route": "identity", "count": 100000, "fail": {"status": 500}}),
        "the managed identity endpoint answered HTTP 500",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_identity_endpoint_is_named_and_spares_key_vaults_breaker() {
    identity_outage_spares_key_vault(
        json!({"route": "identity", "hang": true, "duration_ms": 600_000}),
        "the managed identity endpoint did not answer within",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_from_the_identity_endpoint_is_read_no_further_than_its_bound() {
    // A proxy answering IMDS's address with a page that never ends: read no further than
    // 64 KiB, told as the endpoint's (not Key Vault's, nor the credential's time bound),
    // counted as the managed identity call's failure.
    let metrics = identity_outage_spares_key_vault(
        json!({"route": "identity.imds", "endless_body": true, "duration_ms": 600_000}),
        "the managed identity endpoint's answer is larger than 64 KiB",
    )
    .await;
    assert!(
        metrics.contains(
            r#"tokenbroker_upstream_calls_total{code="too_large",result="error",upstream="managed_identity"}"#
        ),
        "{metrics}"
    );
}

/// With the managed identity endpoint failing as `fault` says, callers are told what it
/// `says` (not Key Vault's silence), Key Vault's breakers stay closed however many calls
/// fail, and calls are served once the endpoint recovers. The metrics as of the outage.
async fn identity_outage_spares_key_vault(fault: serde_json::Value, says: &str) -> String {
    let stack = Stack::start().await;
    stack.admin_post("/faults", fault).await;
    // More calls than it takes to open a breaker (5 failures), each retried by the broker.
    for tenant in ["contoso", "fabrikam"].iter().cycle().take(6) {
        let s = stack.get(tenant, GRAPH).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        let m = s.message();
        assert!(m.contains(says), "{m}");
        assert!(!m.contains("Key Vault is unavailable or throttling"), "{m}");
        assert!(!m.contains("retry budget"), "{m}");
    }
    let metrics = stack.metrics().await;
    let key_vault: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tokenbroker_breaker_state{") && l.contains("keyvault"))
        .collect();
    assert!(!key_vault.is_empty(), "{metrics}");
    assert!(key_vault.iter().all(|l| l.ends_with(" 0")), "{key_vault:?}");
    // The endpoint recovers: served once the key's short hold-off has passed (no breaker of
    // Key Vault's to wait out).
    stack.clear_faults().await;
    stack.get_after_hold_off("contoso", GRAPH).await;
    stack.stop().await;
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_retry_budget_cuts_off_is_counted_as_a_failed_upstream_call() {
    // A blackholed Entra: its call never ends on its own. Alerts on upstream failures must
    // see it.
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        format!("{toml}\n[resilience]\nretry_budget_secs = 1\n")
    })
    .await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "hang": true, "count": 1, "duration_ms": 120000}),
        )
        .await;
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["Entra ID", "retry budget"],
    );
    let m = stack.metrics().await;
    assert!(
        m.contains(
            r#"tokenbroker_upstream_calls_total{code="cut_off",result="error",upstream="entra"} 1"#
        ),
        "{m}"
    );
    stack.stop().await;
}

/// The broker configuration with the audit trail written to `/dev/full`: every write fails
/// with "No space left on device", as on a full disk.
fn audit_to_a_full_disk(extra: &'static str) -> impl FnOnce(String) -> String {
    audit_to("/dev/full".into(), extra)
}

/// The broker configuration with the audit trail written to `file`.
fn audit_to(file: String, extra: &'static str) -> impl FnOnce(String) -> String {
    move |toml: String| {
        let toml: String = toml
            .lines()
            .map(|l| {
                if l.starts_with("file = ") {
                    format!("file = {file:?}\n{extra}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        toml
    }
}

/// Asks until the broker has found out that its audit trail cannot be written (its writer
/// tries every few milliseconds); the first answers may have gone out before that.
async fn until_audit_fails(
    stack: &Stack,
) -> Result<tokenbroker::proto::GetTokenResponse, tonic::Status> {
    for _ in 0..600 {
        let r = stack.get("contoso", GRAPH).await;
        if stack
            .metrics()
            .await
            .lines()
            .any(|l| l == "tokenbroker_audit_failing 1")
        {
            return stack.get("contoso", GRAPH).await;
        }
        drop(r);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the audit trail's failure was never noticed");
}

/// `/readyz`'s status once it is `want`, or its last status after ten seconds.
async fn readyz_within(stack: &Stack, want: u16) -> u16 {
    let mut status = 0;
    for _ in 0..100 {
        status = reqwest::get(format!("http://{}/readyz", stack.admin))
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_served_while_the_audit_trail_cannot_be_written() {
    let stack = Stack::start_with(
        tokenbroker::emulator::EmulatorConfig::demo(),
        audit_to_a_full_disk(""),
    )
    .await;
    let e = until_audit_fails(&stack).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("audit trail cannot be written")
            && e.message().contains("No space left on device")
            && e.message().contains("no token is served unaudited"),
        "{}",
        e.message()
    );
    assert!(e.metadata().get("retry-after").is_some(), "{e:?}");
    // Not ready meanwhile: load balancers send callers to replicas that can serve them.
    assert_eq!(readyz_within(&stack, 503).await, 503);
    // A caller's own mistakes still come first.
    assert_eq!(
        stack.get("", GRAPH).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_to_serve_the_broker_serves_while_the_audit_trail_cannot_be_written() {
    let stack = Stack::start_with(
        tokenbroker::emulator::EmulatorConfig::demo(),
        audit_to_a_full_disk("on_write_failure = \"serve\""),
    )
    .await;
    let t = until_audit_fails(&stack).await.unwrap();
    assert_eq!(t.tenant_id, demo::CONTOSO_TENANT);
    // Readiness is looked at every second: it stays ready.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(readyz_within(&stack, 200).await, 200);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_served_while_nobody_reads_the_audit_pipe_and_all_resumes_once_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Held open (for reading and writing, so opening it blocks no one) and not read: once
    // the pipe's buffer is full, the broker's write of its records neither returns nor fails.
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    // Read from when told, or after a while anyway, so a broker that blocks for good fails
    // the test below instead of hanging it.
    let (read_now, told) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = told.recv_timeout(std::time::Duration::from_secs(150));
        let _ = std::io::copy(&mut &pipe, &mut std::io::sink());
    });
    let stack = Stack::start_with(
        tokenbroker::emulator::EmulatorConfig::demo(),
        audit_to(fifo.to_str().unwrap().to_owned(), ""),
    )
    .await;
    // Each answer adds a record until the pipe is full and the write has hung for 5 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let refused = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled audit output was never noticed"
        );
        match stack.get("contoso", GRAPH).await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("audit trail cannot be written")
            && refused.message().contains("accepted nothing for"),
        "{}",
        refused.message()
    );
    // The runtime still answers: health, metrics, refusals.
    assert_eq!(readyz_within(&stack, 503).await, 503);
    assert!(
        stack
            .metrics()
            .await
            .lines()
            .any(|l| l == "tokenbroker_audit_failing 1")
    );
    assert_eq!(
        stack.get("contoso", GRAPH).await.unwrap_err().code(),
        Code::Unavailable
    );
    // Someone reads the pipe again: the write returns and tokens are served again.
    read_now.send(()).unwrap();
    assert_eq!(readyz_within(&stack, 200).await, 200);
    let t = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(t.tenant_id, demo::CONTOSO_TENANT);
    assert!(
        stack
            .metrics()
            .await
            .lines()
            .any(|l| l == "tokenbroker_audit_failing 0")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_outside_entras_time_window_is_retried_once_then_names_the_clock() {
    let stack = Stack::start().await;
    // Entra's clock is an hour ahead of this host's: every assertion has expired there.
    stack
        .admin_post("/clock/advance", json!({"seconds": 3600}))
        .await;
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("AADSTS700024") && e.message().contains("check this host's clock"),
        "{}",
        e.message()
    );
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2,
        "one retry, with a fresh assertion"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_budget_is_passed_to_the_caller_at_once() {
    let stack = Stack::start().await;
    // Entra asks for a minute; the fetch's budget is 10 s: no point in waiting it out.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 5, "fail": {"status": 429, "retry_after": 60}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["Entra ID"],
    );
    assert_eq!(
        s.metadata().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("60"),
        "{s:?}"
    );
    assert_eq!(stack.route_total("entra.token").await, 1, "not retried");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_after_is_passed_to_the_caller_as_five_minutes_at_most() {
    let stack = Stack::start().await;
    // A proxy in Key Vault's place asks for some thirty years.
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 5,
                   "fail": {"status": 503, "headers": {"Retry-After": "1000000000"}}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["Key Vault"],
    );
    assert_eq!(
        s.metadata().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("300"),
        "{s:?}"
    );
    assert_eq!(stack.route_total("keyvault.sign").await, 1, "not retried");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_given_as_an_http_date_is_read_as_one() {
    let stack = Stack::start().await;
    // Two minutes from now, in the IMF-fixdate form proxies and gateways send.
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(120);
    let date = at
        .format(
            &time::format_description::parse_borrowed::<2>(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
            )
            .unwrap(),
        )
        .unwrap();
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 5,
                   "fail": {"status": 503, "headers": {"Retry-After": date}}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["Entra ID"],
    );
    let secs: u64 = s
        .metadata()
        .get("retry-after")
        .expect("the caller is told when to come back")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((100..=120).contains(&secs), "retry-after {secs}");
    assert_eq!(stack.route_total("entra.token").await, 1, "not retried");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_response_and_a_proxys_page_are_retryable_and_named() {
    let stack = Stack::start().await;
    // A 200 whose body is not a token response (a truncated or rewritten answer).
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 200, "raw_body": "{\"token_type\":\"Bearer\",\"acc"}}),
        )
        .await;
    assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["unreadable token response"],
    );
    assert!(
        stack.route_total("entra.token").await >= 2,
        "retried within the budget"
    );
    stack.clear_faults().await;
    // A gateway's HTML page: not Entra's verdict, so not remembered as a configuration error,
    // and its body (which could echo the request) is not quoted.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 502, "content_type": "text/html",
                            "raw_body": "<html><body>Bad Gateway: upstream reset</body></html>"}}),
        )
        .await;
    let s = assert_status(
        stack.get("fabrikam", GRAPH).await,
        Code::Unavailable,
        &["HTTP 502", "a proxy or gateway answered"],
    );
    assert!(!s.message().contains("upstream reset"), "{}", s.message());
    stack.clear_faults().await;
    // Neither was remembered as the tenant's: both get tokens once Entra answers again and
    // the outage's short hold-off is over.
    stack.get_after_hold_off("contoso", GRAPH).await;
    stack.get_after_hold_off("fabrikam", GRAPH).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_from_entras_place_is_read_no_further_than_its_bound() {
    let stack = Stack::start().await;
    // A page of 1.5 MiB is read no further than 1 MiB (more than any answer of Entra's), so a
    // misbehaving gateway cannot make the broker hold what it sends.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 502, "content_type": "text/html",
                            "raw_body": "<p>PAGE-MARKER</p>".repeat(3 * 512 * 1024 / 18)}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["larger than 1024 KiB", "a proxy or gateway answered"],
    );
    assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
    stack.clear_faults().await;
    // Not Entra's verdict, so not remembered as the configuration's fault.
    stack.get_after_hold_off("contoso", GRAPH).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_endless_answer_in_key_vaults_place_is_read_no_further_than_its_bound() {
    let stack = Stack::start().await;
    // A page that never ends, and one declaring 1.5 MiB, with 200: neither is read past
    // 1 MiB (more than any answer of Key Vault's), so a misbehaving proxy cannot make the
    // broker hold what it sends.
    let page = "<p>PAGE-MARKER</p>".repeat(3 * 512 * 1024 / 18);
    for (tenant, fault) in [
        (
            "contoso",
            json!({"route": "keyvault.sign", "endless_body": true, "duration_ms": 600_000}),
        ),
        (
            "fabrikam",
            json!({"route": "keyvault.sign", "count": 100,
                   "fail": {"status": 200, "content_type": "text/html", "raw_body": page}}),
        ),
    ] {
        stack.admin_post("/faults", fault).await;
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::Unavailable,
            &[
                "Key Vault is unavailable",
                "Key Vault's answer is larger than 1024 KiB",
                "a proxy or gateway may have answered",
            ],
        );
        assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
        assert!(
            stack.route_total("keyvault.sign").await >= 2,
            "retried within the budget"
        );
        // Counted as Key Vault's failed calls.
        let m = stack.metrics().await;
        assert!(
            m.contains(
                r#"tokenbroker_upstream_calls_total{code="unavailable",result="error",upstream="keyvault_sign"}"#
            ),
            "{m}"
        );
        // Not Key Vault's verdict, so not remembered: served once the page is gone.
        stack.clear_faults().await;
        stack.get_after_hold_off(tenant, GRAPH).await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_answered_with_200_in_key_vaults_place_is_retried_not_remembered() {
    // A captive portal or proxy answering 200 with its own page, for the certificate (before
    // any was read) and for the sign: unreadable, retried, not remembered.
    let stack = Stack::start().await;
    let page = "<html><body>Sign in to continue. PAGE-MARKER</body></html>";
    for (route, tenant, what) in [
        ("keyvault.certificate", "contoso", "certificate contoso-app"),
        ("keyvault.sign", "fabrikam", "sign"),
    ] {
        stack
            .admin_post(
                "/faults",
                json!({"route": route, "count": 100,
                       "fail": {"status": 200, "content_type": "text/html", "raw_body": page}}),
            )
            .await;
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::Unavailable,
            &[
                &format!("unreadable answer for {what} (HTTP 200)"),
                "a proxy or gateway may have answered",
            ],
        );
        assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
        assert!(
            stack.route_total(route).await >= 2,
            "retried within the budget"
        );
        stack.clear_faults().await;
        stack.get_after_hold_off(tenant, GRAPH).await;
    }
    // JSON that is not Key Vault's answer (a gateway's own, or `{}`), with 200: the same.
    const API: &str = "api://contoso-api/.default";
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 100,
                   "fail": {"status": 200, "content_type": "application/json", "raw_body": "{}"}}),
        )
        .await;
    assert_status(
        stack.get("contoso", API).await,
        Code::Unavailable,
        &[
            "answer for sign (HTTP 200) has no signature (value)",
            "a proxy or gateway may have answered",
        ],
    );
    stack.clear_faults().await;
    stack.get_after_hold_off("contoso", API).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_key_vaults_place_is_not_quoted_nor_remembered() {
    let stack = Stack::start().await;
    // A gateway's page that echoes the request, the managed identity's bearer token with it.
    let page = format!(
        "<html><body>Blocked. Authorization: Bearer PAGE-MARKER-eyJ {}</body></html>",
        "x".repeat(64 * 1024)
    );
    for (status, tenant) in [(403, "contoso"), (502, "fabrikam")] {
        stack
            .admin_post(
                "/faults",
                json!({"route": "keyvault.sign", "count": 100,
                       "fail": {"status": status, "content_type": "text/html", "raw_body": page}}),
            )
            .await;
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::Unavailable,
            &[
                &format!("HTTP {status} without a Key Vault error"),
                "a proxy or gateway may have answered",
            ],
        );
        assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
        assert!(s.message().len() < 1000, "{}", s.message());
        stack.clear_faults().await;
        // Not Key Vault's verdict, so not remembered as the tenant's: a token once the
        // outage's short hold-off is over.
        stack.get_after_hold_off(tenant, GRAPH).await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_breaks_off_is_retried_with_a_fresh_assertion() {
    // The head arrives (200), half the body, then nothing: the outbound request timeout
    // (1 s here) covers the body too, so the attempt ends and is retried. Entra may have
    // taken the assertion it never finished answering: the retry must not present its jti
    // again (a server may refuse a replayed jti, as the emulator's strict assertions do, AADSTS50013; before the fix the tenant
    // got FAILED_PRECONDITION, "fix the tenant's configuration").
    let mut strict = tokenbroker::emulator::EmulatorConfig::demo();
    strict.entra.strict_assertions = true;
    let stack = Stack::start_with(strict, |t| {
        t.replace("[outbound]\n", "[outbound]\nrequest_timeout_secs = 1\n")
    })
    .await;
    for route in ["keyvault.sign", "entra.token"] {
        stack
            .admin_post(
                "/faults",
                json!({"route": route, "stall_body": true, "count": 1, "duration_ms": 600_000}),
            )
            .await;
    }
    let t = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange as i32);
    let c = stack.counters().await;
    assert!(
        stack.total_signs().await == 2,
        "the sign that broke off was retried, and the exchange's retry signed anew: {c}"
    );
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2,
        "{c}"
    );
    let sent = stack.assertions.lock().unwrap().clone();
    let jtis: Vec<String> = sent
        .iter()
        .map(|a| claims(a)["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), 2);
    assert_ne!(
        jtis[0], jtis[1],
        "each exchange attempt presents its own assertion"
    );
    // Every answer breaks off: the caller hears which upstream, what happened, and that it
    // is worth retrying.
    for (route, says) in [
        (
            "entra.token",
            [
                "Entra ID answered 200 incomplete_response",
                "body broke off",
            ],
        ),
        ("keyvault.sign", ["Key Vault", "timed out"]),
    ] {
        stack
            .admin_post(
                "/faults",
                json!({"route": route, "stall_body": true, "count": 100, "duration_ms": 600_000}),
            )
            .await;
        let s = assert_status(stack.get("fabrikam", GRAPH).await, Code::Unavailable, &says);
        assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
        stack.clear_faults().await;
        // The failure is shared by the key's callers for its hold-off (no Retry-After).
        tokio::time::sleep(tokenbroker::broker::TRANSIENT_HOLD).await;
    }
    // Neither was remembered as the tenant's fault.
    stack.get("fabrikam", GRAPH).await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_with_no_lifetime_to_speak_of_is_no_token_not_the_callers_fault() {
    let stack = Stack::start().await;
    // Entra issues tokens for an hour or so (10 minutes at the least a policy allows): a 200
    // with `expires_in` 0 is not Entra's, and not the caller's doing, who asked for no minimum.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 200, "body": {"access_token": "x.y.z", "token_type": "Bearer", "expires_in": 0}}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["expires_in", "0s"],
    );
    assert!(!s.message().contains("x.y.z"), "{}", s.message());
    stack.clear_faults().await;
    // Nothing was cached: the next answer's token is served.
    stack.get_after_hold_off("contoso", GRAPH).await;
    stack.stop().await;
}

/// A proxy in the broker's environment (`HTTP_PROXY`, as egress through a corporate proxy
/// is set up) carries Entra's and Key Vault's requests, never the managed identity
/// endpoint's: IMDS and App Service's endpoint are the host's own, which a proxy does not
/// reach (Microsoft: IMDS behind a proxy is unsupported). Here the proxy refuses what it
/// gets, as one does a link-local address, with its own page.
#[test]
fn the_managed_identity_endpoint_is_asked_directly_whatever_proxy_the_environment_names() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = proxied.clone();
    std::thread::spawn(move || {
        for conn in proxy.incoming() {
            let Ok(mut conn) = conn else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 8192];
            let _ = conn.read(&mut buf);
            let page = "<html><body>Access denied by the proxy</body></html>";
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let Served {
        mut child,
        emulator,
        addr,
    } = serve(
        &rt,
        dir.path(),
        "",
        &[("HTTP_PROXY", &proxy_url), ("http_proxy", &proxy_url)],
        std::process::Stdio::null(),
    );
    rt.block_on(async {
        let mut c = client_when_listening(addr).await;
        let got = c
            .get_token(GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            })
            .await;
        assert!(got.is_ok(), "{got:?}");
    });
    assert_eq!(proxied.load(Ordering::SeqCst), 0, "asked through the proxy");
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    rt.block_on(emulator.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_url_not_under_the_vaults_own_domain_is_a_failed_precondition_naming_vault_url() {
    // The vault by another name than its own (an address, a private endpoint's
    // `privatelink` name): Key Vault's challenge names `vault.azure.net`, which the SDK
    // checks the vault's host against, as it should.
    let stack = Stack::start_with(tokenbroker::emulator::EmulatorConfig::demo(), |toml| {
        let at = toml.find("vault_url = \"https://").unwrap() + "vault_url = \"https://".len();
        let host_end = at + toml[at..].find(':').unwrap();
        format!("{}127.0.0.1{}", &toml[..at], &toml[host_end..])
    })
    .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &["vault_url", "vault.azure.net", "127.0.0.1"],
    );
    assert!(
        !s.message().contains("Set verify_challenge_resource"),
        "an SDK option the operator cannot set: {}",
        s.message()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_the_identity_endpoints_place_is_retried_not_remembered() {
    let stack = Stack::start().await;
    // A proxy's or gateway's page with the status the endpoint refuses an identity with: not
    // the endpoint's verdict (its JSON error), so neither "assign the identity" nor remembered.
    let page = "<html><body>Access denied. PAGE-MARKER</body></html>";
    for (status, tenant) in [(403, "contoso"), (401, "contoso-federated")] {
        stack
            .admin_post(
                "/faults",
                json!({"route": "identity.imds", "count": 100,
                       "fail": {"status": status, "content_type": "text/html", "raw_body": page}}),
            )
            .await;
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::Unavailable,
            &[
                &format!("HTTP {status} without the managed identity endpoint's error"),
                "a proxy or gateway may have answered",
                "127.0.0.1",
            ],
        );
        assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
        assert!(!s.message().contains("assign the"), "{}", s.message());
        stack.clear_faults().await;
        stack.get_after_hold_off(tenant, GRAPH).await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_without_key_vaults_bearer_challenge_is_unavailable_and_counted_for_its_breaker() {
    let stack = Stack::start().await;
    // A gateway in the vault's place asking for its own sign-in (Kerberos).
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault", "count": 100000,
                   "fail": {"status": 401, "content_type": "text/html",
                            "raw_body": "<html>Sign in PAGE-MARKER</html>",
                            "headers": {"WWW-Authenticate": "Negotiate"}}}),
        )
        .await;
    for tenant in ["contoso", "fabrikam"].iter().cycle().take(6) {
        let s = assert_status(
            stack.get(tenant, GRAPH).await,
            Code::Unavailable,
            &[
                "HTTP 401 without Key Vault's bearer challenge",
                "WWW-Authenticate: Negotiate",
                "a proxy or gateway may have answered",
            ],
        );
        assert!(!s.message().contains("PAGE-MARKER"), "{}", s.message());
    }
    let metrics = stack.metrics().await;
    let key_vault: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tokenbroker_breaker_state{") && l.contains("keyvault"))
        .collect();
    assert!(
        key_vault.iter().any(|l| !l.ends_with(" 0")),
        "{key_vault:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_identities_on_the_host_and_none_named_says_to_set_identity_client_id() {
    let mut emulator = tokenbroker::emulator::EmulatorConfig::demo();
    // Both of the host's identities user-assigned: IMDS does not pick one.
    emulator.identities[0].system_assigned = false;
    let stack = Stack::start_with(emulator, |toml| toml).await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::FailedPrecondition,
        &[
            "Multiple user assigned identities",
            "set identity.client_id to the client id of the one the broker is to use",
        ],
    );
    assert!(
        !s.message().contains("correct identity.client_id"),
        "{}",
        s.message()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_entras_place_is_not_followed_and_names_its_target() {
    let stack = Stack::start().await;
    let token_url = format!(
        "{}/{}/oauth2/v2.0/token",
        stack
            .emulator()
            .endpoints()
            .authority_host
            .trim_end_matches('/'),
        demo::CONTOSO_TENANT
    );
    // A temporary redirect (a proxy's sign-in page), to where a token would be had: not
    // followed (the assertion goes to Entra only), named, retried.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 307, "raw_body": "",
                            "headers": {"Location": format!("{token_url}?secret=QUERY-MARKER")}}}),
        )
        .await;
    let s = assert_status(
        stack.get("contoso", GRAPH).await,
        Code::Unavailable,
        &["HTTP 307 redirect to", &token_url, "not followed"],
    );
    assert!(!s.message().contains("QUERY-MARKER"), "{}", s.message());
    stack.clear_faults().await;
    stack.get_after_hold_off("contoso", GRAPH).await;
    // A permanent one: the authority host is not Entra's token endpoint, for good.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100,
                   "fail": {"status": 308, "raw_body": "",
                            "headers": {"Location": "https://login.example.net/common/oauth2/v2.0/token"}}}),
        )
        .await;
    assert_status(
        stack.get("fabrikam", GRAPH).await,
        Code::FailedPrecondition,
        &[
            "HTTP 308 redirect to https://login.example.net/common/oauth2/v2.0/token",
            "authority_host",
        ],
    );
    stack.stop().await;
}

#[test]
fn a_request_cut_by_the_drain_bound_at_shutdown_is_in_the_audit_file_as_cancelled() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let emu = tokenbroker::emulator::EmulatorConfig::demo();
    let emulator = rt
        .block_on(tokenbroker::emulator::Emulator::start(
            emu.clone(),
            tokenbroker::emulator::StartOptions::new(dir.path().join("ca.pem")),
        ))
        .unwrap();
    let addr = free_port();
    let config = dir.path().join("broker.toml");
    let toml = tokenbroker::dev::broker_config_toml(&emu, emulator.endpoints(), addr).replacen(
        "plaintext = true",
        "plaintext = true\nshutdown_grace_secs = 1",
        1,
    );
    std::fs::write(&config, toml).unwrap();
    let audit = tokenbroker::dev::audit_file(emulator.endpoints());
    let http = http_client(std::path::Path::new(&emulator.endpoints().ca_cert));
    let faults = format!("{}/faults", emulator.endpoints().admin_url);
    // Entra answers only long after the drain bound.
    rt.block_on(async {
        let r = http
            .post(&faults)
            .json(&json!({"route": "entra.token", "latency_ms": 60000, "count": 1}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut c = rt.block_on(client_when_listening(addr));
    let call = rt.spawn(async move {
        c.get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
    });
    // In flight once the exchange has reached Entra.
    rt.block_on(async {
        wait_for(|| async {
            let v: serde_json::Value = http
                .get(&faults)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["faults"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["spent"] == true)
        })
        .await;
    });
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    let answer = rt.block_on(call).unwrap();
    assert!(answer.is_err(), "{answer:?}");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["rpc"] == "GetToken"
            && r["outcome"] == "cancelled"
            && r["tenant"] == "contoso"
            && r["reason"].as_str().unwrap().contains("shutting down")),
        "{records:#?}"
    );
    rt.block_on(emulator.shutdown());
}
