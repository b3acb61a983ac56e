//! Entra ID's v1.0 token endpoint (`/{tenant}/oauth2/token`), which the v1.0 discovery
//! document names: client credentials with `resource=` rather than `scope=`, answered with
//! every value a string, errors in Entra's error JSON.

use serde_json::Value;
use tokenbroker::emulator::config::demo;

use crate::common::*;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The v1.0 token endpoint as the tenant's v1.0 discovery document names it.
async fn v1_endpoint(env: &Env, tenant: &str) -> String {
    let oidc: Value = env
        .https
        .get(format!(
            "{}/{tenant}/.well-known/openid-configuration",
            env.authority()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    oidc["token_endpoint"].as_str().unwrap().to_owned()
}

async fn post(env: &Env, url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = env
        .https
        .post(url)
        .header("client-request-id", "11111111-2222-3333-4444-555555555555")
        .form(form)
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

/// A Contoso certificate assertion addressed to `aud`.
async fn assertion_for(env: &Env, aud: &str) -> String {
    let (header, mut claims) = env.contoso_assertion_parts().await;
    claims["aud"] = Value::from(aud);
    env.assertion("contoso-app", header, claims).await
}

#[tokio::test]
async fn v1_certificate_assertion_answers_strings_and_the_resource() {
    let env = start_demo().await;
    let url = v1_endpoint(&env, demo::CONTOSO_TENANT).await;
    assert_eq!(
        url,
        format!("{}/{}/oauth2/token", env.authority(), demo::CONTOSO_TENANT)
    );
    let assertion = assertion_for(&env, &url).await;
    let (status, body) = post(
        &env,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", demo::CONTOSO_APP),
            ("resource", GRAPH),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &assertion),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], GRAPH);
    assert!(body.get("refresh_in").is_none(), "{body}");
    let string_int = |k: &str| -> i64 {
        body[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is a string: {body}"))
            .parse()
            .unwrap_or_else(|_| panic!("{k} holds an integer: {body}"))
    };
    let expires_in = string_int("expires_in");
    assert!((3600..=5400).contains(&expires_in), "{body}");
    assert_eq!(string_int("ext_expires_in"), expires_in);
    let c = env
        .verify_with_jwks(body["access_token"].as_str().unwrap(), GRAPH)
        .await;
    assert_eq!(string_int("expires_on"), c["exp"].as_i64().unwrap());
    assert_eq!(string_int("not_before"), c["nbf"].as_i64().unwrap());
    assert_eq!(c["ver"], "1.0");
    assert_eq!(c["appid"], demo::CONTOSO_APP);
    assert_eq!(c["tid"], demo::CONTOSO_TENANT);
}

#[tokio::test]
async fn v1_federated_assertion() {
    let env = start_demo().await;
    let url = v1_endpoint(&env, demo::CONTOSO_TENANT).await;
    let mi = env
        .mi_token("api://AzureADTokenExchange", Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let form = |resource: &'static str| {
        [
            ("grant_type", "client_credentials"),
            ("client_id", demo::CONTOSO_APP),
            ("resource", resource),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", mi.as_str()),
        ]
    };
    let (status, body) = post(&env, &url, &form(GRAPH)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_on"].is_string(), "{body}");
    assert_eq!(claims(body["access_token"].as_str().unwrap())["aud"], GRAPH);
}

#[tokio::test]
async fn v1_errors_are_entras_error_json() {
    let env = start_demo().await;
    let url = v1_endpoint(&env, demo::CONTOSO_TENANT).await;
    let assertion = assertion_for(&env, &url).await;
    let form = |resource: Option<&'static str>, scope: Option<&'static str>| {
        let mut f = vec![
            ("grant_type", "client_credentials"),
            ("client_id", demo::CONTOSO_APP),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ];
        f.extend(resource.map(|r| ("resource", r)));
        f.extend(scope.map(|s| ("scope", s)));
        f
    };
    let entra_shape = |body: &Value| {
        for k in [
            "error",
            "error_description",
            "timestamp",
            "trace_id",
            "error_uri",
        ] {
            assert!(body[k].is_string(), "{k}: {body}");
        }
        assert_eq!(
            body["correlation_id"], "11111111-2222-3333-4444-555555555555",
            "{body}"
        );
        let code = aadsts(body);
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}: ")),
            "{body}"
        );
    };

    // A v2.0 scope is no resource at the v1.0 endpoint.
    let (status, body) = post(
        &env,
        &url,
        &form(None, Some("https://graph.microsoft.com/.default")),
    )
    .await;
    assert_eq!((status, aadsts(&body)), (400, 900144), "{body}");
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("'resource'"),
        "{body}"
    );
    entra_shape(&body);

    // An unknown resource.
    let (status, body) = post(&env, &url, &form(Some("https://unknown.example"), None)).await;
    assert_eq!((status, aadsts(&body)), (400, 500011), "{body}");
    assert_eq!(body["error"], "invalid_resource");
    entra_shape(&body);

    // An unknown tenant.
    let other = url.replace(demo::CONTOSO_TENANT, "00000000-dead-4000-8000-000000000000");
    let (status, body) = post(&env, &other, &form(Some(GRAPH), None)).await;
    assert_eq!((status, aadsts(&body)), (400, 90002), "{body}");
    entra_shape(&body);

    // An assertion addressed to another host's endpoint names the v1.0 endpoint called.
    let elsewhere = assertion_for(
        &env,
        &format!(
            "https://login.microsoftonline.com/{}/oauth2/token",
            demo::CONTOSO_TENANT
        ),
    )
    .await;
    let (status, body) = post(
        &env,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", demo::CONTOSO_APP),
            ("resource", GRAPH),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &elsewhere),
        ],
    )
    .await;
    assert_eq!((status, aadsts(&body)), (401, 50013), "{body}");
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains(&format!("{url}'")),
        "{body}"
    );
    entra_shape(&body);
}

#[tokio::test]
async fn v1_endpoint_and_discovery_are_the_entra_routes_of_faults_and_counters() {
    let env = start_demo().await;
    let url = v1_endpoint(&env, demo::CONTOSO_TENANT).await;
    env.admin(
        reqwest::Method::POST,
        "/faults",
        Some(serde_json::json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "fail": {"status": 503}, "count": 1})),
    )
    .await;
    let (status, body) = post(&env, &url, &[("grant_type", "client_credentials")]).await;
    assert_eq!((status, aadsts(&body)), (503, 90033), "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");

    let (_, counters) = env.admin(reqwest::Method::GET, "/counters", None).await;
    assert_eq!(counters["routes"]["entra.token"]["total"], 1, "{counters}");
    // The v1.0 discovery document fetched above is discovery too.
    assert_eq!(
        counters["routes"]["entra.discovery"]["total"], 1,
        "{counters}"
    );
}
