//! Entra ID: client credentials with certificate and federated assertions, AADSTS errors,
//! discovery documents.

use serde_json::{Value, json};
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::emulator::config::{FederatedCredentialConfig, demo};

use crate::common::*;

const SCOPE: &str = "https://graph.microsoft.com/.default";

#[tokio::test]
async fn certificate_assertion_success_and_token_claims() {
    let env = start_demo().await;
    let (header, claims) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, claims).await;
    let (status, body, headers) = env
        .exchange(
            demo::CONTOSO_TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", SCOPE),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("client-request-id").is_none());
    let request_id = headers["x-ms-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(request_id).is_ok(), "{request_id}");
    assert_eq!(body["token_type"], "Bearer");
    let expires_in = body["expires_in"]
        .as_i64()
        .expect("expires_in is a JSON number");
    assert!((3600..=5400).contains(&expires_in));
    assert!(body["ext_expires_in"].is_i64());
    assert!(body.get("refresh_in").is_none(), "under 2 hours: {body}");
    let token = body["access_token"].as_str().unwrap();
    let c = env.verify_with_jwks(token, GRAPH).await;
    assert_eq!(c["aud"], GRAPH);
    assert_eq!(c["tid"], demo::CONTOSO_TENANT);
    // Graph takes v1.0 tokens: the v1.0 issuer, the calling app in appid.
    assert_eq!(c["appid"], demo::CONTOSO_APP);
    assert_eq!(c["azp"], Value::Null);
    assert_eq!(c["ver"], "1.0");
    assert_eq!(c["roles"], json!(["Files.Read.All"]));
    assert_eq!(
        c["iss"],
        format!("https://sts.windows.net/{}/", demo::CONTOSO_TENANT)
    );
    assert_eq!(c["oid"], c["sub"]);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        expires_in
    );

    // The v1.0 OpenID configuration names the same issuer.
    let oidc = |v2: &'static str| {
        let env = &env;
        async move {
            env.https
                .get(format!(
                    "{}/{}{v2}/.well-known/openid-configuration",
                    env.authority(),
                    demo::CONTOSO_TENANT
                ))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(oidc("").await["issuer"], c["iss"]);

    // The Contoso API takes v2.0 tokens: its client id as audience, however it was asked
    // for, the v2.0 issuer, the calling app in azp.
    for scope in [
        "api://contoso-api/.default".to_owned(),
        format!("{}/.default", demo::CONTOSO_API),
    ] {
        let (header, claims) = env.contoso_assertion_parts().await;
        let assertion = env.assertion("contoso-app", header, claims).await;
        let (status, body) = env
            .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, &scope, &assertion)
            .await;
        assert_eq!(status, 200, "{body}");
        let v2 = claims_of(&body);
        assert_eq!(v2["aud"], demo::CONTOSO_API, "{scope}");
        assert_eq!(v2["azp"], demo::CONTOSO_APP);
        assert_eq!(v2["appid"], Value::Null);
        assert_eq!(v2["ver"], "2.0");
        assert_eq!(
            v2["iss"],
            format!("{}/{}/v2.0", env.authority(), demo::CONTOSO_TENANT)
        );
    }
    // The v2.0 OpenID configuration names the v2.0 issuer, the token endpoint and the JWKS.
    let oidc = oidc("/v2.0").await;
    assert_eq!(
        oidc["issuer"],
        format!("{}/{}/v2.0", env.authority(), demo::CONTOSO_TENANT)
    );
    assert_eq!(
        oidc["token_endpoint"],
        format!(
            "{}/{}/oauth2/v2.0/token",
            env.authority(),
            demo::CONTOSO_TENANT
        )
    );
    assert!(
        oidc["jwks_uri"]
            .as_str()
            .unwrap()
            .ends_with("/discovery/v2.0/keys")
    );

    // A second token for the same app has the same service principal id.
    let (header, claims) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, claims).await;
    let (status, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &assertion)
        .await;
    assert_eq!(status, 200);
    assert_eq!(claims_of(&body)["oid"], c["oid"]);
}

fn claims_of(body: &Value) -> Value {
    claims(body["access_token"].as_str().unwrap())
}

#[tokio::test]
async fn ps256_with_sha256_thumbprint_and_domain_tenant() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (_, cert) = env
        .get_json(&token, "/certificates/contoso-app?api-version=2025-07-01")
        .await;
    use base64::Engine as _;
    use sha2::Digest as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(cert["cer"].as_str().unwrap())
        .unwrap();
    let s256 = b64url(&sha2::Sha256::digest(&der));
    let domain = "contoso.onmicrosoft.com";
    let now = now();
    let claims = json!({
        "aud": format!("{}/{domain}/oauth2/v2.0/token", env.authority()),
        "iss": demo::CONTOSO_APP, "sub": demo::CONTOSO_APP,
        "jti": uuid::Uuid::new_v4().to_string(), "nbf": now, "exp": now + 300,
    });
    let assertion = env
        .assertion(
            "contoso-app",
            json!({"alg": "PS256", "typ": "JWT", "x5t#S256": s256}),
            claims,
        )
        .await;
    let (status, body) = env
        .exchange_assertion(domain, demo::CONTOSO_APP, SCOPE, &assertion)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(claims_of(&body)["tid"], demo::CONTOSO_TENANT);
}

/// Form fields, expected status, OAuth error and AADSTS code.
type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str, u64);

#[tokio::test]
async fn request_errors() {
    let env = start_demo().await;
    let (header, claims) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, claims).await;
    let jwt_bearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

    // Unknown tenant, with client-request-id echoed.
    let resp = env
        .https
        .post(format!(
            "{}/00000000-dead-4000-8000-000000000000/oauth2/v2.0/token",
            env.authority()
        ))
        .header("client-request-id", "11111111-2222-3333-4444-555555555555")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let request_id = resp.headers()["x-ms-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        resp.headers()["client-request-id"],
        "11111111-2222-3333-4444-555555555555"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(aadsts(&body), 90002);
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        body["correlation_id"],
        "11111111-2222-3333-4444-555555555555"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90002: ")
    );
    let description = body["error_description"].as_str().unwrap();
    let lines: Vec<&str> = description.split("\r\n").collect();
    assert_eq!(
        lines.len(),
        4,
        "CRLF-separated as Entra sends it: {description:?}"
    );
    assert!(
        lines[0].starts_with("AADSTS90002: Tenant '"),
        "{description:?}"
    );
    assert_eq!(
        lines[1],
        format!("Trace ID: {}", body["trace_id"].as_str().unwrap())
    );
    assert_eq!(
        lines[2],
        "Correlation ID: 11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(
        lines[3],
        format!("Timestamp: {}", body["timestamp"].as_str().unwrap())
    );
    assert_eq!(
        body["error_uri"],
        "https://login.microsoftonline.com/error?code=90002"
    );
    for f in ["timestamp", "trace_id"] {
        assert!(body[f].is_string());
    }
    assert_eq!(
        body["trace_id"], request_id,
        "x-ms-request-id is the trace id"
    );

    let cases: Vec<Case> = vec![
        // The Contoso app is not in Fabrikam (sent to Fabrikam below).
        (
            vec![("grant_type", "password")],
            400,
            "unsupported_grant_type",
            70003,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", "https://graph.microsoft.com/User.Read"),
                ("client_assertion_type", jwt_bearer),
                ("client_assertion", &assertion),
            ],
            400,
            "invalid_scope",
            1002012,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", "https://unknown.example/.default"),
                ("client_assertion_type", jwt_bearer),
                ("client_assertion", &assertion),
            ],
            400,
            "invalid_resource",
            500011,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                (
                    "scope",
                    "https://graph.microsoft.com/.default api://contoso-api/.default",
                ),
                ("client_assertion_type", jwt_bearer),
                ("client_assertion", &assertion),
            ],
            400,
            "invalid_scope",
            700022,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", "/.default"),
                ("client_assertion_type", jwt_bearer),
                ("client_assertion", &assertion),
            ],
            400,
            "invalid_scope",
            70011,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", SCOPE),
                ("client_assertion_type", "urn:wrong"),
                ("client_assertion", &assertion),
            ],
            400,
            "invalid_request",
            900144,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", SCOPE),
            ],
            401,
            "invalid_client",
            7000218,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", demo::CONTOSO_APP),
                ("scope", SCOPE),
                ("client_assertion_type", jwt_bearer),
                ("client_assertion", "not-a-jwt"),
            ],
            400,
            "invalid_request",
            50027,
        ),
    ];
    for (form, status, error, code) in cases {
        let (s, body, _) = env.exchange(demo::CONTOSO_TENANT, &form).await;
        assert_eq!(
            (s, body["error"].as_str().unwrap(), aadsts(&body)),
            (status, error, code),
            "{form:?}: {body}"
        );
    }
    let (s, body) = env
        .exchange_assertion(demo::FABRIKAM_TENANT, demo::CONTOSO_APP, SCOPE, &assertion)
        .await;
    assert_eq!((s, aadsts(&body)), (400, 700016));
    assert_eq!(body["error"], "unauthorized_client");
}

/// The demo estate with `entra.strict_assertions`.
fn strict() -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config.entra.strict_assertions = true;
    config
}

#[tokio::test]
async fn assertions_are_reusable_and_of_any_lifetime_as_in_entra() {
    // MSAL reuses one assertion for up to 9 minutes; Entra sets no lifetime limit.
    let env = start_demo().await;
    let (header, mut claims) = env.contoso_assertion_parts().await;
    claims["exp"] = (now() + 7200).into();
    let a = env.assertion("contoso-app", header, claims).await;
    for scope in [SCOPE, "api://contoso-api/.default"] {
        let (s, body) = env
            .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, scope, &a)
            .await;
        assert_eq!(s, 200, "{scope}: {body}");
    }
}

#[tokio::test]
async fn assertion_errors() {
    // Strict: the replay and lifetime checks too.
    let env = start(strict()).await;
    let exchange = |a: String| {
        let env = &env;
        async move {
            env.exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
                .await
        }
    };

    // Unregistered key (the Fabrikam certificate) -> 700027.
    let (header, claims) = env.contoso_assertion_parts().await;
    let token = env.kv_token().await;
    let (_, fab) = env
        .get_json(&token, "/certificates/fabrikam-app?api-version=2025-07-01")
        .await;
    let a = env
        .assertion(
            "fabrikam-app",
            json!({"alg": "RS256", "typ": "JWT", "x5t": fab["x5t"]}),
            claims.clone(),
        )
        .await;
    let (s, body) = exchange(a).await;
    assert_eq!((s, aadsts(&body)), (401, 700027), "{body}");
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("The key was not found")
    );

    // Unsupported algorithm -> 700027.
    let mut h = header.clone();
    h["alg"] = "ES256".into();
    let a = env.assertion("contoso-app", h, claims.clone()).await;
    assert_eq!(aadsts(&exchange(a).await.1), 700027);

    // Signature does not match the claims -> 700027.
    let a = env
        .assertion("contoso-app", header.clone(), claims.clone())
        .await;
    let mut parts: Vec<String> = a.split('.').map(str::to_owned).collect();
    let mut tampered = claims.clone();
    tampered["exp"] = (now() + 500).into();
    parts[1] = b64url(&serde_json::to_vec(&tampered).unwrap());
    assert_eq!(aadsts(&exchange(parts.join(".")).await.1), 700027);

    // Audience of another tenant.
    let mut c = claims.clone();
    c["aud"] = format!(
        "{}/{}/oauth2/v2.0/token",
        env.authority(),
        demo::FABRIKAM_TENANT
    )
    .into();
    c["jti"] = uuid::Uuid::new_v4().to_string().into();
    let a = env.assertion("contoso-app", header.clone(), c).await;
    assert_eq!(aadsts(&exchange(a).await.1), 50013);

    // The public cloud's token endpoint, not the one called (a client that names
    // login.microsoftonline.com whatever its authority).
    let mut c = claims.clone();
    c["aud"] = format!(
        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
        demo::CONTOSO_TENANT
    )
    .into();
    c["jti"] = uuid::Uuid::new_v4().to_string().into();
    let a = env.assertion("contoso-app", header.clone(), c).await;
    assert_eq!(aadsts(&exchange(a).await.1), 50013);

    // iss/sub not the client id.
    let mut c = claims.clone();
    c["iss"] = demo::FABRIKAM_APP.into();
    c["jti"] = uuid::Uuid::new_v4().to_string().into();
    let a = env.assertion("contoso-app", header.clone(), c).await;
    assert_eq!(aadsts(&exchange(a).await.1), 700021);

    // Expired, not yet valid, too long-lived -> 700024.
    let now = now();
    for (nbf, exp) in [
        (now - 3600, now - 1200),
        (now + 1200, now + 1800),
        (now, now + 7200),
    ] {
        let mut c = claims.clone();
        c["nbf"] = nbf.into();
        c["exp"] = exp.into();
        c["jti"] = uuid::Uuid::new_v4().to_string().into();
        let a = env.assertion("contoso-app", header.clone(), c).await;
        let (s, body) = exchange(a).await;
        assert_eq!((s, aadsts(&body)), (401, 700024), "nbf {nbf} exp {exp}");
    }

    // No exp or no jti: a malformed assertion, invalid_request 50027 (400), not invalid_client.
    for missing in ["exp", "jti"] {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(missing);
        if missing == "exp" {
            c["jti"] = uuid::Uuid::new_v4().to_string().into();
        }
        let a = env.assertion("contoso-app", header.clone(), c).await;
        let (s, body) = exchange(a).await;
        assert_eq!((s, aadsts(&body)), (400, 50027), "no {missing}: {body}");
        assert_eq!(body["error"], "invalid_request");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains(&format!("no '{missing}' claim")),
            "{body}"
        );
    }

    // Replay: the first use succeeds, the second is refused.
    let a = env
        .assertion("contoso-app", header.clone(), claims.clone())
        .await;
    assert_eq!(exchange(a.clone()).await.0, 200);
    let (s, body) = exchange(a).await;
    assert_eq!((s, aadsts(&body)), (401, 50013));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used")
    );

    // An older, still registered version's key works too.
    let (_, versions) = env
        .get_json(
            &token,
            "/certificates/contoso-app/versions?api-version=2025-07-01",
        )
        .await;
    let old = versions["value"][0]["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (_, old_cert) = env
        .get_json(
            &token,
            &format!("/certificates/contoso-app/{old}?api-version=2025-07-01"),
        )
        .await;
    let mut c = claims.clone();
    c["jti"] = uuid::Uuid::new_v4().to_string().into();
    let h = b64url(
        &serde_json::to_vec(&json!({"alg": "RS256", "typ": "JWT", "x5t": old_cert["x5t"]}))
            .unwrap(),
    );
    let input = format!("{h}.{}", b64url(&serde_json::to_vec(&c).unwrap()));
    use sha2::Digest as _;
    let resp = env
        .sign(
            &token,
            "contoso-app",
            Some(&old),
            "RS256",
            &sha2::Sha256::digest(input.as_bytes()),
        )
        .await;
    let sig = resp.json::<Value>().await.unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(exchange(format!("{input}.{sig}")).await.0, 200);
}

#[tokio::test]
async fn federated_credential_exchange() {
    let mut config = EmulatorConfig::demo();
    // Fabrikam's app trusts the FIC identity but with a wrong issuer / audience / subject each.
    let fic = |issuer: &str, subject: &str, audience: &str| FederatedCredentialConfig {
        issuer: issuer.into(),
        subject: subject.into(),
        audience: audience.into(),
    };
    config.tenants[1].apps[0].federated_credentials = vec![fic(
        "https://elsewhere.example/v2.0",
        demo::FIC_MI_OBJECT_ID,
        "api://AzureADTokenExchange",
    )];
    let env = start(config).await;

    let mi = env
        .mi_token("api://AzureADTokenExchange", Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &mi)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(claims_of(&body)["appid"], demo::CONTOSO_APP);

    let (s, body) = env
        .exchange_assertion(demo::FABRIKAM_TENANT, demo::FABRIKAM_APP, SCOPE, &mi)
        .await;
    assert_eq!((s, aadsts(&body)), (401, 700211), "{body}");

    // Wrong audience: a token for a different exchange audience.
    let other_aud = env
        .mi_token(
            "api://AzureADTokenExchangeUSGov",
            Some(demo::FIC_MI_CLIENT_ID),
        )
        .await;
    let (_, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &other_aud)
        .await;
    assert_eq!(aadsts(&body), 700212, "{body}");

    // Wrong subject: the system-assigned identity is not trusted.
    let system = env.mi_token("api://AzureADTokenExchange", None).await;
    let (_, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &system)
        .await;
    assert_eq!(aadsts(&body), 700213, "{body}");
}

#[tokio::test]
async fn multi_tenant_app() {
    let mut config = EmulatorConfig::demo();
    let mut app = config.tenants[0].apps[0].clone();
    app.federated_credentials.clear();
    config.tenants[1].apps.push(app);
    let env = start(config).await;
    for tenant in [demo::CONTOSO_TENANT, demo::FABRIKAM_TENANT] {
        let (header, mut claims) = env.contoso_assertion_parts().await;
        claims["aud"] = format!("{}/{tenant}/oauth2/v2.0/token", env.authority()).into();
        let a = env.assertion("contoso-app", header, claims).await;
        let (s, body) = env
            .exchange_assertion(tenant, demo::CONTOSO_APP, SCOPE, &a)
            .await;
        assert_eq!(s, 200, "{body}");
        let c = claims_of(&body);
        assert_eq!(c["tid"], tenant);
        assert_eq!(c["appid"], demo::CONTOSO_APP);
    }
}

#[tokio::test]
async fn instance_discovery_for_msal() {
    let env = start_demo().await;
    // MSAL drops the port when it builds this URL.
    let authz = format!(
        "https://127.0.0.1/{}/oauth2/v2.0/authorize",
        demo::CONTOSO_TENANT
    );
    let mut url =
        reqwest::Url::parse(&format!("{}/common/discovery/instance", env.authority())).unwrap();
    url.query_pairs_mut()
        .append_pair("api-version", "1.1")
        .append_pair("authorization_endpoint", &authz);
    let resp = env.https.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["tenant_discovery_endpoint"],
        format!(
            "{}/{}/v2.0/.well-known/openid-configuration",
            env.authority(),
            demo::CONTOSO_TENANT
        )
    );
    let resp = env
        .https
        .get(format!(
            "{}/nope.example/v2.0/.well-known/openid-configuration",
            env.authority()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn tokens_of_two_hours_or_more_carry_refresh_in() {
    let mut config = EmulatorConfig::demo();
    for t in &mut config.tenants {
        for a in &mut t.apps {
            a.token_lifetime_secs = [7201, 7201];
        }
    }
    let env = start(config).await;
    let (header, claims) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, claims).await;
    let (status, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &assertion)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 7201);
    assert_eq!(body["refresh_in"], 3600, "half the lifetime, a JSON number");
}

/// A Contoso client-credentials request for Graph with `claims` (if any) added.
async fn exchange_with_claims(env: &Env, claims: Option<&str>) -> (u16, Value) {
    let (header, assertion_claims) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, assertion_claims).await;
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", demo::CONTOSO_APP),
        ("scope", SCOPE),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.as_str()),
    ];
    form.extend(claims.map(|c| ("claims", c)));
    let (status, body, _) = env.exchange(demo::CONTOSO_TENANT, &form).await;
    (status, body)
}

/// The last claims Entra received for the Contoso app (`GET /counters`).
async fn last_claims(env: &Env) -> Value {
    let (_, counters) = env.admin(reqwest::Method::GET, "/counters", None).await;
    counters["claims"][format!("{}/{}", demo::CONTOSO_TENANT, demo::CONTOSO_APP)].clone()
}

#[tokio::test]
async fn the_cp1_client_capability_makes_a_cae_token_with_the_cae_lifetime() {
    let mut config = EmulatorConfig::demo();
    config.tenants[0].apps[0].cae_token_lifetime_secs = Some([86400, 86400]);
    let env = start(config).await;
    // Without claims: an ordinary token, nothing recorded.
    let (status, body) = exchange_with_claims(&env, None).await;
    assert_eq!(status, 200, "{body}");
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["xms_cc"], Value::Null);
    assert!((3600..=5400).contains(&body["expires_in"].as_i64().unwrap()));
    assert_eq!(last_claims(&env).await, Value::Null);
    // With cp1, merged with a challenge's claims: a CAE token living the CAE lifetime.
    let sent = json!({"access_token": {
        "nbf": {"essential": true, "value": "1700000000"},
        "xms_cc": {"values": ["cp1"]},
    }});
    let (status, body) = exchange_with_claims(&env, Some(&sent.to_string())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 86400);
    assert_eq!(body["refresh_in"], 43200, "a long-lived token's hint");
    let token = body["access_token"].as_str().unwrap();
    let c = env.verify_with_jwks(token, GRAPH).await;
    assert_eq!(c["xms_cc"], json!(["cp1"]));
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        86400
    );
    assert_eq!(last_claims(&env).await, sent);
    // Claims without cp1: recorded, an ordinary token.
    let other = json!({"access_token": {"nbf": {"essential": true, "value": "1"}}});
    let (status, body) = exchange_with_claims(&env, Some(&other.to_string())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["xms_cc"],
        Value::Null
    );
    assert_eq!(last_claims(&env).await, other);
    // The counters' reset forgets them.
    env.admin(reqwest::Method::POST, "/counters/reset", None)
        .await;
    assert_eq!(last_claims(&env).await, Value::Null);
}

#[tokio::test]
async fn cp1_without_a_cae_lifetime_keeps_the_apps_lifetime() {
    let env = start_demo().await;
    let sent = r#"{"access_token":{"xms_cc":{"values":["cp1"]}}}"#;
    let (status, body) = exchange_with_claims(&env, Some(sent)).await;
    assert_eq!(status, 200, "{body}");
    assert!((3600..=5400).contains(&body["expires_in"].as_i64().unwrap()));
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["xms_cc"],
        json!(["cp1"])
    );
}

#[tokio::test]
async fn claims_that_are_not_a_json_object_are_malformed_json_as_entra_answers() {
    let env = start_demo().await;
    for bad in ["{\"access_token\":", "[\"cp1\"]", "cp1"] {
        let (status, body) = exchange_with_claims(&env, Some(bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request");
        assert_eq!(aadsts(&body), 9000410, "{bad}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("AADSTS9000410: Malformed JSON."),
            "{body}"
        );
    }
    assert_eq!(last_claims(&env).await, Value::Null);
}

#[test]
fn a_cae_lifetime_out_of_range_is_refused() {
    for range in [[0, 10], [10, 5], [1, u64::MAX]] {
        let mut config = EmulatorConfig::demo();
        config.tenants[0].apps[0].cae_token_lifetime_secs = Some(range);
        let e = config.validate().unwrap_err().to_string();
        assert!(
            e.contains("cae_token_lifetime_secs must be"),
            "{range:?}: {e}"
        );
    }
}
