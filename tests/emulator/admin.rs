//! Admin API: faults, counters, rotation, app enable/disable, reset.

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenbroker::emulator::config::demo;

use crate::common::*;

const SCOPE: &str = "https://graph.microsoft.com/.default";

#[tokio::test]
async fn health_and_unbounded_faults_rejected() {
    let env = start_demo().await;
    let (s, body) = env.admin(Method::GET, "/healthz", None).await;
    assert_eq!((s, body["status"].as_str()), (200, Some("ok")));
    for bad in [
        json!({"route": "keyvault.sign", "fail": {"status": 429}}),
        json!({"route": "keyvault.sign", "hang": true, "count": 1}),
        json!({"route": "keyvault.sign", "stall_body": true, "count": 1}),
        json!({"route": "keyvault.sign", "stall_body": true, "reset": true, "duration_ms": 1000}),
        json!({"route": "nope", "fail": {"status": 429}, "count": 1}),
        json!({"route": "identity", "count": 1}),
    ] {
        let (s, _) = env.admin(Method::POST, "/faults", Some(bad.clone())).await;
        assert_eq!(s, 400, "{bad}");
    }
}

#[tokio::test]
async fn throttling_fault_with_count() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (s, body) = env
        .admin(Method::POST, "/faults", Some(json!({"route": "keyvault.sign", "fail": {"status": 429, "retry_after": 2, "retry_after_ms": 1500}, "count": 2})))
        .await;
    assert_eq!(s, 201);
    let id = body["id"].as_u64().unwrap();
    let digest = Sha256::digest(b"x");
    for _ in 0..2 {
        let resp = env
            .sign(&token, "contoso-app", None, "RS256", &digest)
            .await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["x-ms-retry-after-ms"], "1500");
        assert_eq!(resp.headers()["x-emulator-faults"], id.to_string().as_str());
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"]["code"],
            "Throttled"
        );
    }
    // Other routes are untouched, and the third sign goes through.
    assert_eq!(
        env.get_json(&token, "/certificates/contoso-app?api-version=7.5")
            .await
            .0,
        200
    );
    assert_eq!(
        env.sign(&token, "contoso-app", None, "RS256", &digest)
            .await
            .status(),
        200
    );
    let (_, counters) = env.admin(Method::GET, "/counters", None).await;
    assert_eq!(counters["routes"]["keyvault.sign"]["failure"], 2);
    assert_eq!(counters["routes"]["keyvault.sign"]["success"], 1);
}

#[tokio::test]
async fn latency_fault_is_applied() {
    let env = start_demo().await;
    let (_, body) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "identity", "latency_ms": 20, "count": 1})),
        )
        .await;
    let id = body["id"].as_u64().unwrap();
    let resp = env.app_service_request().send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "latency alone does not fail the request"
    );
    assert_eq!(resp.headers()["x-emulator-faults"], id.to_string().as_str());
    let resp = env.app_service_request().send().await.unwrap();
    assert!(
        resp.headers().get("x-emulator-faults").is_none(),
        "count bound honoured"
    );
    let (_, faults) = env.admin(Method::GET, "/faults", None).await;
    assert_eq!(
        faults["faults"],
        json!([{"id": id, "route": "identity", "tenant": null, "vault": null, "spent": true,
                "hits": 1, "remaining": 0, "remaining_ms": null}]),
        "spent faults stay listed, marked spent"
    );
}

#[tokio::test]
async fn hang_and_reset_faults() {
    let env = start_demo().await;
    env.admin(Method::POST, "/faults", Some(json!({"route": "identity.appservice", "hang": true, "count": 1, "duration_ms": 600_000}))).await;
    let err = env
        .app_service_request()
        .timeout(CLIENT_TIMEOUT)
        .send()
        .await
        .expect_err("the request hangs until the client gives up");
    assert!(err.is_timeout(), "{err}");
    let resp = env.app_service_request().send().await.unwrap();
    assert_eq!(resp.status(), 200, "only one request hangs");

    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "entra", "reset": true, "count": 1})),
    )
    .await;
    let err = env
        .https
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            env.authority(),
            demo::CONTOSO_TENANT
        ))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect_err("connection dropped");
    assert!(!err.is_timeout(), "{err}");
    let (s, _, _) = env
        .exchange(
            demo::CONTOSO_TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(s, 400, "the next request is answered normally");
}

#[tokio::test]
async fn a_stall_body_fault_sends_half_the_answer_then_breaks_off() {
    let env = start_demo().await;
    let get = || env.app_service_request().send();
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "identity.appservice", "stall_body": true, "count": 1, "duration_ms": 300})),
    )
    .await;
    let mut resp = get().await.unwrap();
    assert_eq!(resp.status(), 200, "the head is the service's");
    let length = resp.content_length().expect("the whole body's length");
    let mut got = Vec::new();
    let err = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => panic!("the body ended after {} of {length} bytes", got.len()),
            Err(e) => break e,
        }
    };
    assert!(!err.is_timeout(), "the emulator broke it off: {err}");
    assert!(length > 100, "a token answer: {length} bytes");
    assert_eq!(
        got.len(),
        length as usize / 2,
        "the first half, then nothing"
    );
    let again = get().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.bytes().await.is_ok(), "only one answer breaks off");
}

#[tokio::test]
async fn a_hung_request_is_counted_when_it_arrives_on_every_route() {
    let env = start_demo().await;
    let requests = [
        ("identity.appservice", env.app_service_request()),
        (
            "keyvault.sign",
            env.https
                .post(format!(
                    "{}/keys/contoso-app/sign?api-version=7.5",
                    env.vault()
                ))
                .json(&json!({"alg": "RS256", "value": b64url(&[0; 32])})),
        ),
        (
            "entra.token",
            env.https
                .post(format!(
                    "{}/{}/oauth2/v2.0/token",
                    env.authority(),
                    demo::CONTOSO_TENANT
                ))
                .form(&[("grant_type", "client_credentials")]),
        ),
    ];
    for (route, _) in &requests {
        env.admin(
            Method::POST,
            "/faults",
            Some(json!({"route": route, "hang": true, "count": 1, "duration_ms": 600_000})),
        )
        .await;
    }
    let routes = requests.each_ref().map(|(route, _)| *route);
    let held: Vec<_> = requests
        .into_iter()
        .map(|(_, r)| tokio::spawn(r.send()))
        .collect();
    // Once every fault is spent, its request is being held: counted, with no outcome yet.
    let counters = || async { env.admin(Method::GET, "/counters", None).await.1 };
    let mut spent = false;
    for _ in 0..500 {
        let (_, f) = env.admin(Method::GET, "/faults", None).await;
        spent = f["faults"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["spent"] == true);
        if spent {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(spent, "every request reached its hang");
    let c = counters().await;
    for route in routes {
        let count = &c["routes"][route];
        assert_eq!(
            (&count["total"], &count["success"], &count["failure"]),
            (&json!(1), &json!(0), &json!(0)),
            "{route}: {c}"
        );
    }
    // Its client gone, a held request is a failure.
    for h in &held {
        h.abort();
    }
    let mut c = counters().await;
    for _ in 0..500 {
        if routes.iter().all(|r| c["routes"][r]["failure"] == 1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c = counters().await;
    }
    for route in routes {
        assert_eq!(c["routes"][route]["failure"], 1, "{route}: {c}");
        assert_eq!(c["routes"][route]["total"], 1, "{route}: {c}");
    }
}

#[tokio::test]
async fn an_endless_body_fault_sends_a_body_that_does_not_end() {
    let env = start_demo().await;
    let (s, _) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "identity.appservice", "endless_body": true, "count": 1})),
        )
        .await;
    assert_eq!(s, 400, "an endless body needs its duration");
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "identity.appservice", "endless_body": true, "count": 1, "duration_ms": 600_000})),
    )
    .await;
    let get = || env.app_service_request().send();
    let mut resp = get().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), None, "no length declared");
    // Far more than any answer, and still coming.
    let mut got = 0;
    while got <= 4 << 20 {
        got += resp.chunk().await.unwrap().expect("more body").len();
    }
    drop(resp);
    let again = get().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(
        again.json::<Value>().await.unwrap()["access_token"].is_string(),
        "only one answer is endless"
    );
}

#[tokio::test]
async fn a_request_counted_before_the_counters_are_reset_leaves_no_outcome_after() {
    let env = start_demo().await;
    let route = "identity.appservice";
    // Held for two seconds, then answered (a reset connection's 502).
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": route, "hang": true, "count": 1, "duration_ms": 2_000})),
    )
    .await;
    let held = tokio::spawn(env.app_service_request().send());
    let mut spent = false;
    for _ in 0..500 {
        let (_, f) = env.admin(Method::GET, "/faults", None).await;
        spent = f["faults"][0]["spent"] == true;
        if spent {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(spent, "the request reached its hang");
    // Reset while it is held (counted in the total that the reset clears); its outcome,
    // recorded once it is answered, is not counted after the reset either.
    env.admin(Method::POST, "/counters/reset", None).await;
    let _ = held.await.unwrap();
    let (_, c) = env.admin(Method::GET, "/counters", None).await;
    let count = &c["routes"][route];
    assert!(
        count.is_null() || (count["total"] == 0 && count["failure"] == 0),
        "{c}"
    );
}

#[tokio::test]
async fn tenant_filtered_entra_fault() {
    let env = start_demo().await;
    env.admin(Method::POST, "/faults", Some(json!({"route": "entra.token", "tenant": "fabrikam.onmicrosoft.com", "fail": {"status": 503}, "duration_ms": 600_000}))).await;
    let (s, body, _) = env
        .exchange(
            demo::FABRIKAM_TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(s, 503);
    assert_eq!(body["error"], "temporarily_unavailable");
    let (s, _, _) = env
        .exchange(
            demo::CONTOSO_TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(s, 400, "other tenants are not affected");
    let (s, _) = env.admin(Method::DELETE, "/faults", None).await;
    assert_eq!(s, 204);
    let (s, _, _) = env
        .exchange(
            demo::FABRIKAM_TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn counters_rotation_disable_and_reset() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (_, cert) = env
        .get_json(&token, "/certificates/contoso-app?api-version=7.5")
        .await;
    let version = cert["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (header, claims) = env.contoso_assertion_parts().await;
    let a = env.assertion("contoso-app", header, claims).await;
    assert_eq!(
        env.exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
            .await
            .0,
        200
    );

    let (_, c) = env.admin(Method::GET, "/counters", None).await;
    assert_eq!(c["sign"][format!("tb-demo/contoso-app/{version}")], 1);
    assert_eq!(
        c["exchanges"][format!("{}/{}", demo::CONTOSO_TENANT, demo::CONTOSO_APP)]["success"],
        1
    );
    assert!(c["mi_tokens"]["broker"].as_u64().unwrap() >= 2);
    assert_eq!(c["routes"]["entra.token"]["total"], 1);
    env.admin(Method::POST, "/counters/reset", None).await;
    let (_, c) = env.admin(Method::GET, "/counters", None).await;
    assert!(c["sign"].as_object().unwrap().is_empty());

    // Rotation registers the new key on the app by default.
    let (s, rotated) = env
        .admin(
            Method::POST,
            "/vaults/tb-demo/certificates/contoso-app/rotate",
            None,
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    assert_eq!(rotated["registered_on_apps"], 1);
    let (_, current) = env
        .get_json(&token, "/certificates/contoso-app?api-version=7.5")
        .await;
    assert_eq!(current["x5t"], rotated["x5t"]);
    let (header, claims) = env.contoso_assertion_parts().await;
    assert_eq!(header["x5t"], rotated["x5t"]);
    let a = env.assertion("contoso-app", header, claims).await;
    assert_eq!(
        env.exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
            .await
            .0,
        200
    );

    // ... or not, so Entra rejects the new key.
    let (_, rotated) = env
        .admin(
            Method::POST,
            "/vaults/tb-demo/certificates/contoso-app/rotate",
            Some(json!({"register_on_apps": false})),
        )
        .await;
    assert_eq!(rotated["registered_on_apps"], 0);
    let (header, claims) = env.contoso_assertion_parts().await;
    let a = env.assertion("contoso-app", header, claims).await;
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
        .await;
    assert_eq!((s, aadsts(&body)), (401, 700027));

    // Disable -> 7000112, enable again.
    let (s, _) = env
        .admin(
            Method::POST,
            &format!(
                "/tenants/contoso.onmicrosoft.com/apps/{}/disable",
                demo::CONTOSO_APP
            ),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
        .await;
    assert_eq!((s, aadsts(&body)), (400, 7000112));
    env.admin(
        Method::POST,
        &format!(
            "/tenants/{}/apps/{}/enable",
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP
        ),
        None,
    )
    .await;
    let (_, body) = env
        .exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
        .await;
    assert_eq!(
        aadsts(&body),
        700027,
        "enabled again; the unregistered key is still refused"
    );

    // Reset: back to the configured versions, app enabled, faults and counters cleared.
    env.admin(
        Method::POST,
        &format!(
            "/tenants/{}/apps/{}/disable",
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP
        ),
        None,
    )
    .await;
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "keyvault", "fail": {"status": 500}, "count": 100})),
    )
    .await;
    let (s, _) = env.admin(Method::POST, "/reset", None).await;
    assert_eq!(s, 204);
    let (s, list) = env
        .get_json(&token, "/certificates/contoso-app/versions?api-version=7.5")
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 2);
    let (_, current) = env
        .get_json(&token, "/certificates/contoso-app?api-version=7.5")
        .await;
    assert_eq!(current["x5t"], cert["x5t"], "same key material as at start");
    let (header, claims) = env.contoso_assertion_parts().await;
    let a = env.assertion("contoso-app", header, claims).await;
    assert_eq!(
        env.exchange_assertion(demo::CONTOSO_TENANT, demo::CONTOSO_APP, SCOPE, &a)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn default_fault_bodies_follow_the_status() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let digest = Sha256::digest(b"x");
    for (status, code) in [
        (400, "BadParameter"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "KeyNotFound"),
        (429, "Throttled"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailable"),
    ] {
        let (s, _) = env
            .admin(
                Method::POST,
                "/faults",
                Some(json!({"route": "keyvault.sign", "fail": {"status": status}, "count": 1})),
            )
            .await;
        assert_eq!(s, 201);
        let resp = env
            .sign(&token, "contoso-app", None, "RS256", &digest)
            .await;
        assert_eq!(resp.status(), status);
        let challenge = resp.headers().get("www-authenticate").cloned();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{status}: {body}");
        if status == 401 {
            assert_eq!(
                challenge.expect("a Key Vault 401 carries the bearer challenge"),
                format!("Bearer authorization=\"https://login.windows.net/{}\", resource=\"https://vault.azure.net\"", demo::CONTOSO_TENANT).as_str()
            );
        } else {
            assert!(challenge.is_none(), "{status}");
        }
    }
    let (_, cert) = env
        .get_json(&token, "/certificates/contoso-app?api-version=7.5")
        .await;
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "keyvault.certificate", "fail": {"status": 404}, "count": 1})),
    )
    .await;
    let (s, body) = env
        .get_json(&token, "/certificates/contoso-app?api-version=7.5")
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("CertificateNotFound"))
    );
    assert!(cert["x5t"].is_string());

    for (status, error, code) in [
        (400, "invalid_request", 90014),
        (401, "invalid_client", 700027),
        (429, "temporarily_unavailable", 90055),
        (503, "temporarily_unavailable", 90033),
    ] {
        env.admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "entra.token", "fail": {"status": status}, "count": 1})),
        )
        .await;
        let (s, body, headers) = env
            .exchange(
                demo::CONTOSO_TENANT,
                &[("grant_type", "client_credentials")],
            )
            .await;
        assert_eq!((s, body["error"].as_str()), (status, Some(error)), "{body}");
        assert_eq!(aadsts(&body), code);
        assert_eq!(
            headers["x-ms-request-id"],
            body["trace_id"].as_str().unwrap(),
            "an injected Entra error names its trace id too"
        );
    }

    // An explicit body still wins.
    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "entra.token", "fail": {"status": 401, "body": {"error": "mine"}}, "count": 1})),
    )
    .await;
    let (s, body, _) = env
        .exchange(
            demo::CONTOSO_TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!((s, body), (401, json!({"error": "mine"})));
}

#[tokio::test]
async fn fault_headers_raw_bodies_and_successes() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let digest = Sha256::digest(b"x");
    let (s, body) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "keyvault.sign", "count": 1, "fail": {
                "status": 200,
                "raw_body": "{\"kid\": \"trunc",
                "headers": {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT", "retry-after-ms": "250"},
            }})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let resp = env
        .sign(&token, "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["retry-after"], "Wed, 21 Oct 2026 07:28:00 GMT");
    assert_eq!(h["retry-after-ms"], "250");
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.text().await.unwrap(), "{\"kid\": \"trunc");

    env.admin(
        Method::POST,
        "/faults",
        Some(json!({"route": "entra.token", "count": 1, "fail": {
            "status": 502, "raw_body": "<html>Bad Gateway</html>", "content_type": "text/html",
        }})),
    )
    .await;
    let resp = env
        .https
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            env.authority(),
            demo::CONTOSO_TENANT
        ))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "text/html");
    assert_eq!(resp.text().await.unwrap(), "<html>Bad Gateway</html>");

    for (bad, why) in [
        (json!({"status": 199}), "200..=599"),
        (json!({"status": 600}), "200..=599"),
        (
            json!({"status": 500, "body": {}, "raw_body": "x"}),
            "raw_body",
        ),
        (
            json!({"status": 500, "headers": {"bad name": "x"}}),
            "header name",
        ),
        (
            json!({"status": 500, "headers": {"x-a": "a\nb"}}),
            "header value",
        ),
        (
            json!({"status": 500, "headers": {"Content-Length": "1"}}),
            "content-length",
        ),
        (
            json!({"status": 500, "raw_body": "x", "content_type": "a\u{7f}"}),
            "content_type",
        ),
    ] {
        let (s, body) = env
            .admin(
                Method::POST,
                "/faults",
                Some(json!({"route": "keyvault.sign", "count": 1, "fail": bad})),
            )
            .await;
        assert_eq!(s, 400, "{bad}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(why), "{bad}: {error}");
    }
}

#[tokio::test]
async fn only_the_applied_fault_is_consumed() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let digest = Sha256::digest(b"x");
    let mut ids = Vec::new();
    for fault in [
        json!({"route": "keyvault.sign", "latency_ms": 1, "count": 2}),
        json!({"route": "keyvault.sign", "fail": {"status": 500}, "count": 1}),
        json!({"route": "keyvault", "fail": {"status": 503}, "count": 1}),
    ] {
        let (_, body) = env.admin(Method::POST, "/faults", Some(fault)).await;
        ids.push(body["id"].as_u64().unwrap());
    }
    let listed = |faults: &Value| -> Vec<(u64, bool)> {
        faults["faults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["hits"].as_u64().unwrap(), f["spent"].as_bool().unwrap()))
            .collect()
    };
    // The latency fault and the first failing fault apply; the second failing one waits
    // for the next request.
    for (status, applied, after) in [
        (500, ids[1], [(1, false), (1, true), (0, false)]),
        (503, ids[2], [(2, true), (1, true), (1, true)]),
    ] {
        let resp = env
            .sign(&token, "contoso-app", None, "RS256", &digest)
            .await;
        assert_eq!(resp.status(), status);
        assert_eq!(
            resp.headers()["x-emulator-faults"],
            format!("{},{applied}", ids[0]).as_str()
        );
        let (_, faults) = env.admin(Method::GET, "/faults", None).await;
        assert_eq!(listed(&faults), after);
    }
    assert_eq!(
        env.sign(&token, "contoso-app", None, "RS256", &digest)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn tenant_and_vault_filters_only_where_requests_have_them() {
    let mut config = tokenbroker::emulator::EmulatorConfig::demo();
    let mut other = config.vaults[0].clone();
    other.name = "tb-other".into();
    other.certificates.clear();
    config.vaults.push(other);
    let env = start(config).await;
    for (fault, why) in [
        (
            json!({"route": "keyvault.sign", "tenant": demo::CONTOSO_TENANT}),
            "entra.token, entra.discovery, graph.list",
        ),
        (
            json!({"route": "identity", "tenant": demo::CONTOSO_TENANT}),
            "has no tenant",
        ),
        (
            json!({"route": "entra.token", "vault": "tb-demo"}),
            "has no vault",
        ),
        (
            json!({"route": "keyvault", "vault": "nope"}),
            "unknown vault",
        ),
    ] {
        let mut fault = fault;
        fault["fail"] = json!({"status": 500});
        fault["count"] = json!(1);
        let (s, body) = env
            .admin(Method::POST, "/faults", Some(fault.clone()))
            .await;
        assert_eq!(s, 400, "{fault}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(why), "{fault}: {error}");
    }
    for ok in [
        json!({"route": "entra", "tenant": demo::CONTOSO_TENANT}),
        json!({"route": "graph", "tenant": "contoso.onmicrosoft.com"}),
    ] {
        let mut ok = ok;
        ok["latency_ms"] = json!(1);
        ok["count"] = json!(1);
        assert_eq!(env.admin(Method::POST, "/faults", Some(ok)).await.0, 201);
    }
    env.admin(Method::DELETE, "/faults", None).await;

    let token = env.kv_token().await;
    let digest = Sha256::digest(b"x");
    let (_, other) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "keyvault", "vault": "TB-OTHER.vault.azure.net", "fail": {"status": 500}, "count": 1})),
        )
        .await;
    let (_, demo_fault) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "keyvault.sign", "vault": "tb-demo", "fail": {"status": 503}, "count": 1})),
        )
        .await;
    let resp = env
        .sign(&token, "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-emulator-faults"],
        demo_fault["id"].to_string().as_str()
    );
    assert_eq!(
        env.sign(&token, "contoso-app", None, "RS256", &digest)
            .await
            .status(),
        200,
        "the other vault's fault does not apply to tb-demo"
    );
    let (_, faults) = env.admin(Method::GET, "/faults", None).await;
    let listed = &faults["faults"][0];
    assert_eq!(listed["id"], other["id"]);
    assert_eq!(
        (&listed["vault"], &listed["hits"], &listed["spent"]),
        (&json!("tb-other"), &json!(0), &json!(false))
    );
}
