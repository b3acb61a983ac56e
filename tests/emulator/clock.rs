//! The clock offset: `POST /clock/advance` moves every time the emulated services issue or check.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokenbroker::emulator::config::demo;

use crate::common::*;

const SCOPE: &str = "https://graph.microsoft.com/.default";
const HOUR: i64 = 3600;

/// Entra's error `timestamp` format for unix seconds `t`.
fn entra_timestamp(t: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(t).expect("valid time");
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn close_to(actual: &Value, expected: i64) -> bool {
    actual.as_i64().is_some_and(|a| (a - expected).abs() <= 5)
}

async fn advance(env: &Env, seconds: Value) -> (u16, Value) {
    env.admin(
        Method::POST,
        "/clock/advance",
        Some(json!({ "seconds": seconds })),
    )
    .await
}

#[tokio::test]
async fn advance_is_cumulative_validated_and_reset() {
    let env = start_demo().await;
    let (s, body) = env.admin(Method::GET, "/clock", None).await;
    assert_eq!(s, 200);
    assert_eq!(body["offset_secs"], 0);
    assert!(close_to(&body["now"], now()), "{body}");

    assert_eq!(
        advance(&env, json!(3600)).await,
        (200, json!({"offset_secs": 3600}))
    );
    assert_eq!(
        advance(&env, json!(0)).await,
        (200, json!({"offset_secs": 3600}))
    );
    assert_eq!(
        advance(&env, json!(0.5)).await,
        (200, json!({"offset_secs": 3600.5}))
    );
    assert_eq!(
        env.emu.advance_clock(Duration::from_millis(1500)),
        Duration::from_secs(3602)
    );
    let (_, body) = env.admin(Method::GET, "/clock", None).await;
    assert_eq!(body["offset_secs"], 3602);
    assert!(close_to(&body["now"], now() + 3602), "{body}");

    for bad in [
        json!(-1),
        json!(-0.5),
        json!("60"),
        json!(null),
        json!(1e300),
    ] {
        let (s, _) = advance(&env, bad.clone()).await;
        assert_eq!(s, 400, "{bad}");
    }
    let (s, _) = env
        .admin(Method::POST, "/clock/advance", Some(json!({"secs": 1})))
        .await;
    assert_eq!(s, 400, "unknown field");
    assert_eq!(env.emu.clock_offset(), Duration::from_secs(3602));

    let (s, _) = env.admin(Method::POST, "/reset", None).await;
    assert_eq!(s, 204);
    let (_, body) = env.admin(Method::GET, "/clock", None).await;
    assert_eq!(body["offset_secs"], 0);
    assert!(close_to(&body["now"], now()), "{body}");
}

#[tokio::test]
async fn tokens_and_assertions_follow_the_advanced_clock() {
    let mut config = tokenbroker::emulator::EmulatorConfig::demo();
    config.entra.strict_assertions = true;
    let env = start(config).await;
    let old_mi = env.kv_token().await;
    let cert_path = "/certificates/contoso-app?api-version=2025-07-01";
    assert_eq!(env.get_json(&old_mi, cert_path).await.0, 200);
    // Built on real time, before the advance.
    let (header, stale_claims) = env.contoso_assertion_parts().await;

    assert_eq!(advance(&env, json!(2 * HOUR)).await.0, 200);
    let emu_now = now() + 2 * HOUR;

    // An assertion dated on real time is now 2 hours old: 700024.
    let stale = env
        .assertion("contoso-app", header.clone(), stale_claims)
        .await;
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &stale)
        .await;
    assert_eq!((s, aadsts(&body)), (401, 700024), "{body}");
    // Error timestamps are on the emulator's clock too.
    let ts = body["timestamp"].as_str().expect("timestamp");
    assert!(
        (-5..=5).any(|d| entra_timestamp(emu_now + d) == ts),
        "timestamp {ts} is not near emulator time {}",
        entra_timestamp(emu_now)
    );

    // One dated on the advanced clock is accepted, and the access token is dated likewise.
    let fresh_claims = json!({
        "aud": format!("{}/{}/oauth2/v2.0/token", env.authority(), demo::CONTOSO_TENANT),
        "iss": demo::CONTOSO_APP,
        "sub": demo::CONTOSO_APP,
        "jti": uuid::Uuid::new_v4().to_string(),
        "nbf": emu_now,
        "exp": emu_now + 600,
    });
    let fresh = env
        .assertion("contoso-app", header.clone(), fresh_claims.clone())
        .await;
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &fresh)
        .await;
    assert_eq!(s, 200, "{body}");
    let at = claims(body["access_token"].as_str().expect("access_token"));
    assert!(close_to(&at["iat"], emu_now), "{at}");
    assert!(close_to(&at["nbf"], emu_now), "{at}");
    let lifetime = body["expires_in"].as_i64().expect("expires_in");
    assert!(close_to(&at["exp"], emu_now + lifetime), "{at}");
    // The replay window is on the same clock: the same jti is still refused.
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &fresh)
        .await;
    assert_eq!((s, aadsts(&body)), (401, 50013), "{body}");

    // Managed-identity tokens live 24 h: the old one is still good 2 hours later...
    assert_eq!(env.get_json(&old_mi, cert_path).await.0, 200);
    // ...and refused as expired once the clock passes its expiry plus Key Vault's 5 min skew.
    assert_eq!(advance(&env, json!(23 * HOUR)).await.0, 200);
    let emu_now = now() + 25 * HOUR;
    let resp = env
        .https
        .get(format!("{}{cert_path}", env.vault()))
        .bearer_auth(&old_mi)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let body: Value = resp.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("AKV10013"), "{body}");

    // A new one is dated on the emulator's clock and works.
    let url = format!(
        "{}?api-version=2019-08-01&resource={VAULT_RESOURCE}",
        env.ep().identity_endpoint
    );
    let body: Value = env
        .http
        .get(url)
        .header("X-IDENTITY-HEADER", &env.ep().identity_header)
        .send()
        .await
        .expect("mi request")
        .json()
        .await
        .expect("json");
    let expires_on: i64 = body["expires_on"]
        .as_str()
        .expect("expires_on")
        .parse()
        .unwrap();
    assert!((expires_on - (emu_now + 24 * HOUR)).abs() <= 5, "{body}");
    let new_mi = body["access_token"].as_str().expect("token");
    let c = claims(new_mi);
    assert!(
        close_to(&c["iat"], emu_now) && close_to(&c["nbf"], emu_now),
        "{c}"
    );
    assert_eq!(env.get_json(new_mi, cert_path).await.0, 200);

    // Key Vault still signs (certificate validity is checked on the emulator's clock too).
    let mut claims2 = fresh_claims;
    claims2["jti"] = json!(uuid::Uuid::new_v4().to_string());
    claims2["nbf"] = json!(emu_now);
    claims2["exp"] = json!(emu_now + 600);
    let a = env.assertion("contoso-app", header, claims2).await;
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
        .await;
    assert_eq!(s, 200, "{body}");

    // IMDS shape: not_before / expires_on on the emulator's clock.
    let body: Value = env
        .imds(&format!("api-version=2018-02-01&resource={VAULT_RESOURCE}"))
        .await
        .json()
        .await
        .expect("json");
    let nbf: i64 = body["not_before"]
        .as_str()
        .expect("not_before")
        .parse()
        .unwrap();
    assert!((nbf - emu_now).abs() <= 5, "{body}");
}

#[tokio::test]
async fn certificates_expire_on_the_emulator_clock() {
    // A certificate valid for one day cannot sign once the clock is two days ahead.
    let mut config = tokenbroker::emulator::EmulatorConfig::demo();
    for v in &mut config.vaults {
        for c in &mut v.certificates {
            c.validity_days = 1;
        }
    }
    let env = start(config).await;
    let digest = [7u8; 32];
    let token = env.kv_token().await;
    assert_eq!(
        env.sign(&token, "contoso-app", None, "RS256", &digest)
            .await
            .status(),
        200
    );
    // Signed while the certificate was valid, presented after its end: Entra judges the
    // app's key credential, whose validity is the certificate's.
    let (header, claims) = env.contoso_assertion_parts().await;
    let signed_before = env.assertion("contoso-app", header, claims).await;
    assert_eq!(advance(&env, json!(2 * 24 * HOUR)).await.0, 200);
    let (s, body) = env
        .exchange_assertion(
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
            SCOPE,
            &signed_before,
        )
        .await;
    assert_eq!(
        (s, body["error_codes"][0].as_i64()),
        (401, Some(700027)),
        "{body}"
    );
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.contains("is expired on application")
            && description.contains("The key used is expired")
            && description.contains("Found key 'Start="),
        "{description}"
    );
    let token = env.kv_token().await;
    let resp = env
        .sign(&token, "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 403);
    // A rotated version is made on the emulator's clock, so it is valid there.
    let (s, _) = env
        .admin(
            Method::POST,
            "/vaults/tb-demo/certificates/contoso-app/rotate",
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        env.sign(&token, "contoso-app", None, "RS256", &digest)
            .await
            .status(),
        200
    );
}
