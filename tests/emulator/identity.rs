//! Managed identity: App Service and IMDS shapes, identity selection, errors.

use serde_json::Value;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::emulator::config::demo;

use crate::common::*;

#[tokio::test]
async fn app_service_shape_and_claims() {
    let env = start_demo().await;
    let url = format!(
        "{}?api-version=2019-08-01&resource={}",
        env.ep().identity_endpoint,
        VAULT_RESOURCE
    );
    let resp = env
        .http
        .get(&url)
        .header("X-IDENTITY-HEADER", &env.ep().identity_header)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    for field in [
        "access_token",
        "expires_on",
        "resource",
        "token_type",
        "client_id",
    ] {
        assert!(
            body[field].is_string(),
            "{field} must be a string in {body}"
        );
    }
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], demo::BROKER_MI_CLIENT_ID);
    let expires_on: i64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires_on > now() + 23 * 3600, "about a day of lifetime");

    let token = body["access_token"].as_str().unwrap();
    let claims = env.verify_with_jwks(token, VAULT_RESOURCE).await;
    assert_eq!(claims["aud"], VAULT_RESOURCE);
    assert_eq!(claims["oid"], demo::BROKER_MI_OBJECT_ID);
    assert_eq!(claims["sub"], demo::BROKER_MI_OBJECT_ID);
    // A v1.0 token: the identity in appid, not azp.
    assert_eq!(claims["appid"], demo::BROKER_MI_CLIENT_ID);
    assert_eq!(claims["azp"], Value::Null);
    assert_eq!(claims["tid"], demo::CONTOSO_TENANT);
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(
        claims["iss"],
        format!("https://sts.windows.net/{}/", demo::CONTOSO_TENANT)
    );
    assert!(
        claims["xms_mirid"]
            .as_str()
            .unwrap()
            .contains("/userAssignedIdentities/broker")
    );

    // Wrong or missing identity header.
    let resp = env
        .http
        .get(&url)
        .header("X-IDENTITY-HEADER", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = env.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn imds_shape_all_strings() {
    let env = start_demo().await;
    let resp = env
        .imds(&format!(
            "api-version=2018-02-01&resource=https://management.azure.com/&client_id={}",
            demo::FIC_MI_CLIENT_ID
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let fields = [
        "access_token",
        "refresh_token",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ];
    for field in fields {
        assert!(
            body[field].is_string(),
            "{field} must be a string in {body}"
        );
    }
    assert_eq!(body.as_object().unwrap().len(), fields.len());
    assert_eq!(body["resource"], "https://management.azure.com/");
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["oid"], demo::FIC_MI_OBJECT_ID);
    assert_eq!(c["aud"], "https://management.azure.com/");

    // Missing Metadata header.
    let url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/",
        env.ep().imds_endpoint
    );
    let resp = env.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bad_request_102");
    assert_eq!(
        body["error_description"],
        "Required metadata header not specified"
    );

    // By object id and by resource id.
    for q in [
        format!("object_id={}", demo::FIC_MI_OBJECT_ID),
        "msi_res_id=/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/broker-fic".to_owned(),
    ] {
        let resp = env.imds(&format!("api-version=2018-02-01&resource=https://vault.azure.net&{q}")).await;
        assert_eq!(resp.status(), 200, "{q}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(claims(body["access_token"].as_str().unwrap())["oid"], demo::FIC_MI_OBJECT_ID);
    }

    // Unknown identity and missing resource.
    let resp = env.imds("api-version=2018-02-01&resource=https://vault.azure.net&client_id=00000000-0000-0000-0000-000000000099").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let resp = env.imds("api-version=2018-02-01").await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn multiple_user_assigned_need_a_selector() {
    let mut config = EmulatorConfig::demo();
    config.identities.retain(|i| !i.system_assigned);
    let mut second = config.identities[0].clone();
    second.name = "second".into();
    second.client_id = "5ec0d000-0000-4000-8000-000000000001".into();
    second.object_id = "5ec0d000-0000-4000-8000-000000000002".into();
    config.identities.push(second);
    let env = start(config).await;

    let resp = env
        .imds("api-version=2018-02-01&resource=https://vault.azure.net")
        .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        body["error_description"],
        "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request"
    );
    // Naming one works.
    let token = env
        .mi_token(VAULT_RESOURCE, Some("5ec0d000-0000-4000-8000-000000000001"))
        .await;
    assert_eq!(
        claims(&token)["oid"],
        "5ec0d000-0000-4000-8000-000000000002"
    );
}

#[tokio::test]
async fn app_service_names_no_user_assigned_identity_by_itself() {
    // Only a user-assigned identity on the host: IMDS picks it, App Service does not.
    let mut config = EmulatorConfig::demo();
    config.identities.retain(|i| !i.system_assigned);
    let lone = config.identities[0].client_id.clone();
    let env = start(config).await;
    let app_service = |selector: &str| {
        let url = format!(
            "{}?api-version=2019-08-01&resource={VAULT_RESOURCE}{selector}",
            env.ep().identity_endpoint
        );
        env.http
            .get(url)
            .header("X-IDENTITY-HEADER", &env.ep().identity_header)
            .send()
    };
    for selector in [
        String::new(),
        "&client_id=0badc0de-0000-4000-8000-000000000bad".into(),
    ] {
        let resp = app_service(&selector).await.unwrap();
        assert_eq!(resp.status(), 400, "{selector}");
        let correlation = resp.headers()["x-correlation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["statusCode"], 400);
        assert_eq!(
            body["message"],
            "Unable to load the proper Managed Identity."
        );
        assert_eq!(body["correlationId"], correlation);
    }
    let named = app_service(&format!("&client_id={lone}")).await.unwrap();
    assert_eq!(named.status(), 200);
    let imds = env
        .imds(&format!("api-version=2018-02-01&resource={VAULT_RESOURCE}"))
        .await;
    assert_eq!(imds.status(), 200);
}

#[tokio::test]
async fn token_exchange_audience_uses_v2_issuer() {
    let env = start_demo().await;
    let token = env
        .mi_token("api://AzureADTokenExchange", Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let c = claims(&token);
    assert_eq!(
        c["iss"],
        format!("{}/{}/v2.0", env.authority(), demo::CONTOSO_TENANT)
    );
    assert_eq!(c["aud"], "api://AzureADTokenExchange");
    assert_eq!(c["sub"], demo::FIC_MI_OBJECT_ID);
    // A v2.0 token: the identity in azp, not appid.
    assert_eq!(c["azp"], demo::FIC_MI_CLIENT_ID);
    assert_eq!(c["appid"], serde_json::Value::Null);
}

#[tokio::test]
async fn imds_refuses_unknown_api_versions() {
    let env = start_demo().await;
    let get = |version: &str| {
        let url = format!(
            "{}/metadata/identity/oauth2/token?api-version={version}&resource=https://vault.azure.net",
            env.ep().imds_endpoint
        );
        env.http.get(url).header("Metadata", "true").send()
    };
    // Python's azure-identity and MSAL send 2018-02-01, the Rust SDK 2019-08-01.
    for v in ["2018-02-01", "2019-08-01", "2021-02-01"] {
        assert_eq!(get(v).await.unwrap().status(), 200, "{v}");
    }
    for v in ["2017-12-01", "2019-08-02", "latest"] {
        let resp = get(v).await.unwrap();
        assert_eq!(resp.status(), 400, "{v}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("Invalid or unsupported api-version '{v}'")),
            "{description}"
        );
    }
}

#[tokio::test]
async fn imds_hands_out_the_same_token_until_it_expires() {
    // Ten-minute tokens, to reach their end on the emulator's clock.
    let mut config = EmulatorConfig::demo();
    config.identities[0].token_lifetime_secs = Some(600);
    let env = start(config).await;
    let ask = |resource: &'static str| {
        let env = &env;
        async move {
            let resp = env
                .imds(&format!("api-version=2018-02-01&resource={resource}"))
                .await;
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let first = ask(VAULT_RESOURCE).await;
    assert_eq!(first["expires_in"], "600");
    // Another resource: a token of its own.
    let other = ask("https://management.azure.com/").await;
    assert_ne!(other["access_token"], first["access_token"]);
    // Four minutes on: the same token, with what is left of its life.
    let (s, _) = env
        .admin(
            reqwest::Method::POST,
            "/clock/advance",
            Some(serde_json::json!({"seconds": 240})),
        )
        .await;
    assert_eq!(s, 200);
    let again = ask(VAULT_RESOURCE).await;
    assert_eq!(again["access_token"], first["access_token"]);
    assert_eq!(again["expires_on"], first["expires_on"]);
    let left: i64 = again["expires_in"].as_str().unwrap().parse().unwrap();
    assert!((355..=360).contains(&left), "{again}");
    // Expired: a new one.
    env.admin(
        reqwest::Method::POST,
        "/clock/advance",
        Some(serde_json::json!({"seconds": 360})),
    )
    .await;
    let renewed = ask(VAULT_RESOURCE).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(renewed["expires_in"], "600");
}

#[tokio::test]
async fn an_identity_token_lifetime_out_of_range_is_refused() {
    let mut config = EmulatorConfig::demo();
    config.identities[0].token_lifetime_secs = Some(59);
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("token_lifetime_secs"), "{err}");
}
