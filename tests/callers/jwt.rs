use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokenbroker::audit::Outcome;
use tonic::Code;

use crate::harness::*;
use crate::issuer::{TestIssuer, now, sign_es256, unsigned};

const SVC: &str = "jwt:test:svc-a";

async fn start() -> Harness {
    Harness::start(Options {
        policy: grants(&[(SVC, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_bearer_token_is_accepted_as_issuer_and_subject() {
    let h = start().await;
    let t = h
        .get(None, Some(&h.issuer.token("svc-a")), "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(t.tenant_id, demo::CONTOSO_TENANT);
    let r = h.records();
    assert_eq!(r[0].caller.as_deref(), Some(SVC));
    assert_eq!(serde_json::to_value(r[0].proof).unwrap(), json!("jwt"));
    // A bearer token names the caller even on a connection with a client certificate.
    let leaf = h.ca.client(&["spiffe://example.org/sidecar"]);
    h.get(
        Some(&leaf),
        Some(&h.issuer.token("svc-a")),
        "contoso",
        &[GRAPH],
    )
    .await
    .unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_and_nbf_are_judged_with_the_issuers_leeway() {
    let h = start().await;
    let i = &h.issuer;
    let with = |exp: i64, nbf: i64| {
        let mut c = i.claims("svc-a");
        c["exp"] = json!(exp);
        c["nbf"] = json!(nbf);
        i.sign_with("key-1", &c)
    };
    // The issuer's default leeway is 60 s, for clocks a little apart.
    let late = with(now() - 30, now() - 600);
    h.get(None, Some(&late), "contoso", &[GRAPH]).await.unwrap();
    let early = with(now() + 600, now() + 30);
    h.get(None, Some(&early), "contoso", &[GRAPH])
        .await
        .unwrap();
    // Told with the times, so that a clock set wrong on either side can be seen.
    let rfc3339 = |t: i64| {
        tokenbroker::audit::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
    };
    let exp = now() - 90;
    let s = assert_status(
        h.get(None, Some(&with(exp, now() - 600)), "contoso", &[GRAPH])
            .await,
        Code::Unauthenticated,
        &[
            "expired at ",
            &rfc3339(exp),
            "60 s",
            "the broker's clock reads 20",
        ],
    );
    assert!(!s.message().contains('\n'), "{s:?}");
    let nbf = now() + 90;
    assert_status(
        h.get(None, Some(&with(now() + 600, nbf)), "contoso", &[GRAPH])
            .await,
        Code::Unauthenticated,
        &[
            "not valid yet",
            &format!("before {}", rfc3339(nbf)),
            "60 s",
            "the broker's clock reads 20",
        ],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bearer_tokens_are_unauthenticated_with_the_reason() {
    let h = start().await;
    let i = &h.issuer;
    let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = i.claims("svc-a");
        edit(&mut c);
        c
    };
    let good = i.token("svc-a");
    let (head, rest) = good.split_once('.').unwrap();
    let (_payload, sig) = rest.split_once('.').unwrap();
    let forged_payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        claims(&|c| c["sub"] = json!("admin")).to_string(),
    );
    let hmac = {
        let mut hd = Header::new(Algorithm::HS256);
        hd.kid = Some("key-1".into());
        jsonwebtoken::encode(
            &hd,
            &i.claims("svc-a"),
            &EncodingKey::from_secret(i.public_pem().as_bytes()),
        )
        .unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            i.sign_with(
                "key-1",
                &claims(&|c| {
                    c["exp"] = json!(now() - 600);
                    c["nbf"] = json!(now() - 1200);
                }),
            ),
            "expired",
        ),
        (
            "not yet valid",
            i.sign_with("key-1", &claims(&|c| c["nbf"] = json!(now() + 600))),
            "not valid yet",
        ),
        (
            "wrong audience",
            i.sign_with(
                "key-1",
                &claims(&|c| c["aud"] = json!("api://someone-else")),
            ),
            // What the token must carry, so that its holder can ask for the right one.
            "wrong audience: the token's `aud` does not name `api://tokenbroker`",
        ),
        (
            "wrong issuer",
            i.sign_with(
                "key-1",
                &claims(&|c| c["iss"] = json!("https://evil.example")),
            ),
            "issuer `https://evil.example` is not trusted",
        ),
        (
            "alg none",
            unsigned(
                &json!({"alg": "none", "typ": "JWT"}),
                &i.claims("svc-a"),
                b"",
            ),
            "algorithm `none` is not allowed",
        ),
        (
            "HMAC with the public key",
            hmac,
            "algorithm `HS256` is not allowed",
        ),
        (
            "tampered payload",
            format!("{head}.{forged_payload}.{sig}"),
            "signature does not verify",
        ),
        (
            "unknown kid",
            sign_es256(
                &rcgen::KeyPair::generate().unwrap(),
                "rogue",
                &i.claims("svc-a"),
            ),
            "unknown key (kid `rogue`)",
        ),
        (
            "exp not a number",
            i.sign_with("key-1", &claims(&|c| c["exp"] = json!("tomorrow"))),
            "malformed: claim `exp` is not a NumericDate",
        ),
        (
            "aud not a string",
            i.sign_with("key-1", &claims(&|c| c["aud"] = json!(42))),
            "malformed: claim `aud` is not a string or an array of strings",
        ),
        (
            "no aud",
            i.sign_with(
                "key-1",
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
            ),
            "missing claim `aud`",
        ),
        (
            "iss not a string",
            i.sign_with("key-1", &claims(&|c| c["iss"] = json!([i.url()]))),
            "malformed: claim `iss` is not a string",
        ),
        ("not a JWT", "opaque-token".to_string(), "malformed"),
        (
            "over 16 KiB",
            format!("{head}.{}.{sig}", "A".repeat(16 * 1024)),
            "longer than 16384 bytes",
        ),
    ];
    for (what, token, words) in &cases {
        let s = assert_status(
            h.get(None, Some(token), "contoso", &[GRAPH]).await,
            Code::Unauthenticated,
            &["bearer token", words],
        );
        assert!(
            !s.message().contains(token.as_str()),
            "{what}: token echoed"
        );
    }
    // Refusals from one address are summarised, but every one is accounted for.
    let r = h.stop_and_records().await;
    assert_eq!(requests_in(&r), cases.len() as u64, "{r:#?}");
    assert!(
        r.iter()
            .all(|r| r.caller.is_none() && r.code == "UNAUTHENTICATED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_issuer_key_is_fetched_once_and_unknown_kids_do_not_hammer_the_issuer() {
    let h = start().await;
    let i = &h.issuer;
    h.get(None, Some(&i.token("svc-a")), "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(i.jwks_fetches(), 1);
    h.get(None, Some(&i.token("svc-a")), "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(i.jwks_fetches(), 1, "known keys are not re-fetched");

    i.rotate("key-2");
    let rotated = i.sign_with("key-2", &i.claims("svc-a"));
    h.get(None, Some(&rotated), "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(i.jwks_fetches(), 2, "an unknown kid refreshes the keys");

    for n in 0..5 {
        let forged = sign_es256(
            &rcgen::KeyPair::generate().unwrap(),
            &format!("rogue-{n}"),
            &i.claims("svc-a"),
        );
        assert_status(
            h.get(None, Some(&forged), "contoso", &[GRAPH]).await,
            Code::Unauthenticated,
            &["unknown key"],
        );
    }
    assert_eq!(
        i.jwks_fetches(),
        2,
        "refreshes for unknown kids are rate-limited"
    );
    // Without a kid, a token of an issuer with several keys names none of them: told so.
    let s = assert_status(
        h.get(
            None,
            Some(&i.sign_without_kid("key-2", &i.claims("svc-a"))),
            "contoso",
            &[GRAPH],
        )
        .await,
        Code::Unauthenticated,
        &[
            "names no key (no `kid` in its header)",
            "issuer `test` publishes 3 keys",
        ],
    );
    assert!(!s.message().contains("kid `none`"), "{s:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_remembering_turned_off_every_request_is_verified_in_full() {
    let h = Harness::start(Options {
        policy: grants(&[(SVC, "contoso", GRAPH)]),
        callers: "remember_tokens = 0",
        ..Default::default()
    })
    .await;
    let jwt = h.access.authenticator().jwt().unwrap();
    let token = h.issuer.token("svc-a");
    for _ in 0..3 {
        h.get(None, Some(&token), "contoso", &[GRAPH])
            .await
            .unwrap();
    }
    assert_eq!(jwt.signature_checks(), 3);
    assert_eq!(h.records().len(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_token_is_not_checked_again_until_the_issuer_keys_change() {
    let h = start().await;
    let i = &h.issuer;
    let jwt = h.access.authenticator().jwt().unwrap();
    let token = i.token("svc-a");
    for _ in 0..3 {
        h.get(None, Some(&token), "contoso", &[GRAPH])
            .await
            .unwrap();
    }
    assert_eq!(jwt.signature_checks(), 1, "the same token is verified once");
    let records = h.records();
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.caller.as_deref() == Some(SVC)));
    // Another token of the same caller is a token of its own.
    let mut claims = i.claims("svc-a");
    claims["jti"] = "another".into();
    h.get(
        None,
        Some(&i.sign_with("key-1", &claims)),
        "contoso",
        &[GRAPH],
    )
    .await
    .unwrap();
    assert_eq!(jwt.signature_checks(), 2);
    // A remembered token is still only good for what the policy grants.
    assert_status(
        h.get(None, Some(&token), "fabrikam", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );

    // The issuer withdraws key-1; the broker fetches its keys again for a key-2 token.
    i.rotate("key-2");
    i.withdraw("key-1");
    let rotated = i.sign_with("key-2", &i.claims("svc-a"));
    h.get(None, Some(&rotated), "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(i.jwks_fetches(), 2);
    // The token verified with the withdrawn key is checked again, and refused.
    assert_status(
        h.get(None, Some(&token), "contoso", &[GRAPH]).await,
        Code::Unauthenticated,
        &["unknown key"],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_app_token_names_the_app_as_caller() {
    // A certificate caller may have contoso's own API token; that token, issued by the
    // (emulated) Entra tenant, then identifies the contoso app to the broker.
    let fetcher = "spiffe://example.org/fetcher";
    let app = format!("jwt:contoso-entra:{}", demo::CONTOSO_APP);
    let h = Harness::start(Options {
        policy: grants(&[(fetcher, "contoso", CONTOSO_API), (&app, "fabrikam", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[fetcher]);
    let entra_token = h
        .get(Some(&leaf), None, "contoso", &[CONTOSO_API])
        .await
        .unwrap()
        .access_token;
    let t = h
        .get(None, Some(&entra_token), "fabrikam", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(t.tenant_id, demo::FABRIKAM_TENANT);
    let r = h.records();
    assert_eq!(r[1].caller.as_deref(), Some(app.as_str()));
    assert_eq!(r[1].app_id.as_deref(), Some(demo::CONTOSO_APP));
    // Not granted contoso: the Entra identity gets only what the policy names.
    assert_status(
        h.get(None, Some(&entra_token), "contoso", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tokens_from_one_address_are_limited_and_tokens_verified_before_still_work() {
    const CERT: &str = "spiffe://example.org/ns/a/sa/cert-caller";
    let h = Harness::start(Options {
        policy: grants(&[(SVC, "contoso", GRAPH), (CERT, "contoso", GRAPH)]),
        limits: "failed_auth_per_sec = 0.001\nfailed_auth_burst = 3",
        ..Default::default()
    })
    .await;
    let i = &h.issuer;
    let jwt = h.access.authenticator().jwt().unwrap();
    let good = i.token("svc-a");
    h.get(None, Some(&good), "contoso", &[GRAPH]).await.unwrap();
    // Signed with a key of the issuer's kid that is not the issuer's: a bad signature.
    let forged = || {
        sign_es256(
            &rcgen::KeyPair::generate().unwrap(),
            "key-1",
            &i.claims("svc-a"),
        )
    };
    for _ in 0..3 {
        assert_status(
            h.get(None, Some(&forged()), "contoso", &[GRAPH]).await,
            Code::Unauthenticated,
            &["signature"],
        );
    }
    let checks = jwt.signature_checks();
    let s = assert_status(
        h.get(None, Some(&forged()), "contoso", &[GRAPH]).await,
        Code::ResourceExhausted,
        &["too many failed authentications from this address"],
    );
    assert!(retry_after_secs(&s) >= 1, "{s:?}");
    // A new token from this address waits as well, without being checked.
    let mut claims = i.claims("svc-a");
    claims["jti"] = "new".into();
    assert_status(
        h.get(
            None,
            Some(&i.sign_with("key-1", &claims)),
            "contoso",
            &[GRAPH],
        )
        .await,
        Code::ResourceExhausted,
        &[],
    );
    assert_eq!(
        jwt.signature_checks(),
        checks,
        "a held-back token is not checked"
    );
    // The token that verified before, and callers with client certificates, still get theirs.
    h.get(None, Some(&good), "contoso", &[GRAPH]).await.unwrap();
    h.get(Some(&h.ca.client(&[CERT])), None, "contoso", &[GRAPH])
        .await
        .unwrap();
    // Every refusal is in the audit trail.
    let held: Vec<_> = h
        .stop_and_records()
        .await
        .into_iter()
        .filter(|r| r.code == "RESOURCE_EXHAUSTED")
        .collect();
    assert_eq!(requests_in(&held), 2, "{held:#?}");
    assert!(
        held.iter()
            .all(|r| r.outcome == Outcome::Denied && r.caller.is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_serving_an_oversized_jwks_is_refused_as_an_unreachable_one_is() {
    const CERT: &str = "spiffe://example.org/ns/a/sa/cert-caller";
    let big = TestIssuer::start().await;
    big.oversize_jwks(true);
    // An issuer nobody answers for: a loopback port let go of.
    let gone = format!("http://{}", tokenbroker::bench::free_port().unwrap());
    let h = Harness::start(Options {
        policy: grants(&[
            (SVC, "contoso", GRAPH),
            ("jwt:big:svc-a", "contoso", GRAPH),
            ("jwt:gone:svc-a", "contoso", GRAPH),
            (CERT, "contoso", GRAPH),
        ]),
        issuers: vec![("big", big.url()), ("gone", gone.clone())],
        ..Default::default()
    })
    .await;
    let i = &h.issuer;
    let mut claims = i.claims("svc-a");
    claims["iss"] = json!(gone);
    let unreachable = assert_status(
        h.get(
            None,
            Some(&i.sign_with("key-1", &claims)),
            "contoso",
            &[GRAPH],
        )
        .await,
        Code::Unavailable,
        &["issuer `gone`"],
    );
    // The JWKS is asked for, and refused for its size: the caller is told as for an issuer
    // that cannot be reached (the broker's log has the cause).
    let oversized = assert_status(
        h.get(None, Some(&big.token("svc-a")), "contoso", &[GRAPH])
            .await,
        Code::Unavailable,
        &["issuer `big`"],
    );
    assert_eq!(big.jwks_fetches(), 1);
    assert_eq!(
        oversized.message().replace("`big`", "`gone`"),
        unreachable.message()
    );
    assert_eq!(retry_after_secs(&oversized), retry_after_secs(&unreachable));

    // Keys fetched before stay in use when a later JWKS is oversized: a rotated key is not
    // had, the known one still verifies.
    h.get(None, Some(&i.token("svc-a")), "contoso", &[GRAPH])
        .await
        .unwrap();
    i.oversize_jwks(true);
    i.rotate("key-2");
    assert_status(
        h.get(
            None,
            Some(&i.sign_with("key-2", &i.claims("svc-a"))),
            "contoso",
            &[GRAPH],
        )
        .await,
        Code::Unauthenticated,
        &["unknown key"],
    );
    assert_eq!(i.jwks_fetches(), 2);
    let mut claims = i.claims("svc-a");
    claims["jti"] = json!("another");
    h.get(
        None,
        Some(&i.sign_with("key-1", &claims)),
        "contoso",
        &[GRAPH],
    )
    .await
    .unwrap();
    // And the broker serves on.
    h.get(Some(&h.ca.client(&[CERT])), None, "contoso", &[GRAPH])
        .await
        .unwrap();
    h.stop().await;
}
