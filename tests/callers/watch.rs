//! WatchToken streams: every token a watch sends is in the audit trail and goes out only
//! while the trail can be written; a watch ends when the credential that opened it does;
//! watches are bounded per caller.

use std::time::Duration;

use tokenbroker::audit::Outcome;
use tokenbroker::broker::TokenRequest;
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{GetTokenRequest, WatchTokenRequest, WatchTokenResponse};
use tokenbroker::sensitive::fingerprint;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::harness::{GRAPH, Harness, Options, assert_status, grants};
use crate::issuer::now;
use crate::pki::Leaf;

const A: &str = "spiffe://example.org/ns/a/sa/watcher";

fn watch_request(bearer: Option<&str>) -> tonic::Request<WatchTokenRequest> {
    let mut req = tonic::Request::new(WatchTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
    });
    if let Some(b) = bearer {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    req
}

async fn watch(
    client: &mut TokenBrokerClient<Channel>,
    bearer: Option<&str>,
) -> Result<Streaming<WatchTokenResponse>, tonic::Status> {
    Ok(client
        .watch_token(watch_request(bearer))
        .await?
        .into_inner())
}

/// The next message of a watch, bounded so a broken watch fails the test instead of hanging.
async fn next(w: &mut Streaming<WatchTokenResponse>) -> Result<WatchTokenResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), w.message())
        .await
        .expect("a message within 30 s")
        .map(|m| m.expect("a message, not the end of the stream"))
}

/// A forced refresh of contoso's Graph token, by `cert`'s caller.
async fn force_refresh(h: &Harness, cert: &Leaf) -> String {
    h.client(Some(cert))
        .await
        .unwrap()
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            force_refresh: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .access_token
}

/// A broker granting `A` contoso's Graph token, `A`'s certificate, its watch of that token,
/// and the first token the watch sent.
async fn watching_a() -> (Harness, Leaf, Streaming<WatchTokenResponse>, String) {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let mut w = watch(&mut h.client(Some(&a)).await.unwrap(), None)
        .await
        .unwrap();
    let first = next(&mut w).await.unwrap().token.unwrap().access_token;
    (h, a, w, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_a_watch_sends_is_in_the_audit_trail_with_its_fingerprint() {
    let (h, a, mut w, first) = watching_a().await;
    let refreshed = force_refresh(&h, &a).await;
    let second = next(&mut w).await.unwrap().token.unwrap().access_token;
    assert_eq!(second, refreshed, "the watch sends the new token");
    assert_ne!(first, second);

    let records = h.records();
    let watches: Vec<_> = records.iter().filter(|r| r.rpc == "WatchToken").collect();
    let [admitted, sent @ ..] = watches.as_slice() else {
        panic!("no watch records: {records:?}");
    };
    assert_eq!(admitted.outcome, Outcome::Allowed);
    assert_eq!(
        admitted.token_fingerprint, None,
        "admission sends no token yet"
    );
    assert_eq!(
        sent.iter()
            .map(|r| r.token_fingerprint.unwrap())
            .collect::<Vec<_>>(),
        vec![
            fingerprint(first.as_bytes()),
            fingerprint(second.as_bytes())
        ],
        "one record per token sent, in order"
    );
    for r in sent {
        assert_eq!(r.request_id, admitted.request_id, "{r:?}");
        assert_eq!(r.caller.as_deref(), Some(A));
        assert_eq!((r.outcome, r.code), (Outcome::Allowed, "OK"));
        assert_eq!(r.tenant, "contoso");
        assert!(r.expires_at.is_some());
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sends_no_token_while_the_audit_trail_cannot_be_written() {
    let (h, _, mut w, _) = watching_a().await;
    h.audit.set_failure(Some("No space left on device"));
    // A new token in the cache (fetched behind the API's back: requests are refused now);
    // the watch must not send it unaudited.
    h.broker
        .get_token(TokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            min_validity: None,
            force_refresh: true,
            claims: None,
        })
        .await
        .unwrap();
    let end = next(&mut w).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(
        end.message().contains("no token is served unaudited"),
        "{end:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(30), w.message())
            .await
            .unwrap()
            .is_ok_and(|m| m.is_none()),
        "the stream ends after the refusal"
    );
    let sent = h
        .records()
        .into_iter()
        .filter(|r| r.rpc == "WatchToken" && r.token_fingerprint.is_some())
        .count();
    assert_eq!(sent, 1, "only the first token went out");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_bearer_token_that_opened_it_expires() {
    const SUB: &str = "watcher";
    let h = Harness::start(Options {
        policy: grants(&[(&format!("jwt:test:{SUB}"), "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // Expired 58 s ago, within the issuer's 60 s leeway: accepted for two more seconds.
    let mut claims = h.issuer.claims(SUB);
    claims["exp"] = (now() - 58).into();
    let bearer = h.issuer.sign_with("key-1", &claims);
    let mut client = h.client(None).await.unwrap();
    let mut w = watch(&mut client, Some(&bearer)).await.unwrap();
    let mut other = watch(&mut client, Some(&bearer)).await.unwrap();
    next(&mut w).await.unwrap().token.unwrap();
    next(&mut other).await.unwrap().token.unwrap();
    let end = next(&mut w).await.unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert_eq!(
        next(&mut other).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(
        end.message().contains("credential expired at 20")
            && end.message().contains("fresh credential"),
        "{end:?}"
    );
    // The same token can no longer open one either.
    assert_status(
        watch(&mut client, Some(&bearer)).await,
        Code::Unauthenticated,
        &["expired"],
    );
    // Each watch's end is a record of its own (not folded into a summary of repeats).
    let ended: Vec<_> = h
        .records()
        .into_iter()
        .filter(|r| r.rpc == "WatchToken" && r.code == "UNAUTHENTICATED" && r.caller.is_some())
        .collect();
    assert_eq!(ended.len(), 2, "{ended:#?}");
    assert_ne!(ended[0].request_id, ended[1].request_id);
    for r in &ended {
        assert_eq!(r.caller.as_deref(), Some("jwt:test:watcher"));
        assert_eq!((r.outcome, r.repeats), (Outcome::Denied, None));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_issuer_withdraws_the_key_its_bearer_token_was_signed_with() {
    // A request with a token signed by a withdrawn key is refused once the broker fetches
    // the issuer's keys without it; a watch opened with such a token must not go on.
    const SUB: &str = "rotated";
    let h = Harness::start(Options {
        policy: grants(&[(&format!("jwt:test:{SUB}"), "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let old = h.issuer.sign_with("key-1", &h.issuer.claims(SUB));
    let mut client = h.client(None).await.unwrap();
    let mut w = watch(&mut client, Some(&old)).await.unwrap();
    next(&mut w).await.unwrap().token.unwrap();
    // The issuer rotates to key-2 and withdraws key-1; a key-2 token makes the broker fetch
    // the keys again, and forces a refresh the watch hears of.
    h.issuer.rotate("key-2");
    h.issuer.withdraw("key-1");
    let new = h.issuer.sign_with("key-2", &h.issuer.claims(SUB));
    let mut req = tonic::Request::new(GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        force_refresh: true,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {new}").parse().unwrap());
    client.get_token(req).await.unwrap();
    // The old token opens no new watch, and its open one sends no more tokens.
    assert_status(
        watch(&mut client, Some(&old)).await,
        Code::Unauthenticated,
        &["unknown key"],
    );
    let end = next(&mut w).await;
    assert!(
        end.as_ref().is_err_and(
            |e| e.code() == Code::Unauthenticated && e.message().contains("unknown key")
        ),
        "{:?}",
        end.map(|m| m.token.is_some())
    );
    let ended: Vec<_> = h
        .records()
        .into_iter()
        .filter(|r| r.rpc == "WatchToken" && r.code == "UNAUTHENTICATED" && r.caller.is_some())
        .collect();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_eq!(ended[0].caller.as_deref(), Some("jwt:test:rotated"));
    assert_eq!(ended[0].outcome, Outcome::Denied);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchs_bearer_token_is_checked_again_even_when_its_address_is_over_its_failures() {
    // Verified in full at each token (nothing remembered); forged tokens from the watch's
    // address use up its failures: the watch's own good token is neither refused for them
    // nor spared its check.
    const SUB: &str = "behind-nat";
    let h = Harness::start(Options {
        policy: grants(&[
            (&format!("jwt:test:{SUB}"), "contoso", GRAPH),
            (A, "contoso", GRAPH),
        ]),
        limits: "failed_auth_per_sec = 0.001\nfailed_auth_burst = 2",
        callers: "remember_tokens = 0",
        ..Default::default()
    })
    .await;
    let good = h.issuer.sign_with("key-1", &h.issuer.claims(SUB));
    let mut client = h.client(None).await.unwrap();
    let mut w = watch(&mut client, Some(&good)).await.unwrap();
    next(&mut w).await.unwrap().token.unwrap();
    let mut forged = h.issuer.claims(SUB);
    forged["aud"] = "someone-else".into();
    let forged = h.issuer.sign_with("key-1", &forged);
    for _ in 0..3 {
        let _ = client
            .get_token(watch_request(Some(&forged)).map(|r| GetTokenRequest {
                tenant: r.tenant,
                scopes: r.scopes,
                ..Default::default()
            }))
            .await
            .unwrap_err();
    }
    assert_status(
        watch(&mut client, Some(&forged)).await,
        Code::ResourceExhausted,
        &["too many failed authentications"],
    );
    let a = h.ca.client(&[A]);
    let refreshed = force_refresh(&h, &a).await;
    let sent = next(&mut w).await.map(|m| m.token.map(|t| t.access_token));
    match sent {
        Ok(token) => assert_eq!(token, Some(refreshed)),
        Err(e) => panic!("the watch ended: {e:?}"),
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_whose_exp_has_a_fraction_keeps_its_watch_until_then() {
    // RFC 7519's NumericDate may have a fraction; such a token is valid for ten minutes.
    const SUB: &str = "fractional";
    let h = Harness::start(Options {
        policy: grants(&[(&format!("jwt:test:{SUB}"), "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let mut claims = h.issuer.claims(SUB);
    claims["exp"] = (now() as f64 + 600.5).into();
    let bearer = h.issuer.sign_with("key-1", &claims);
    let mut client = h.client(None).await.unwrap();
    let mut w = watch(&mut client, Some(&bearer)).await.unwrap();
    let first = next(&mut w).await;
    assert!(
        first.as_ref().is_ok_and(|m| m.token.is_some()),
        "{:?}",
        first.map(|m| m.refresh_failing)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_bounded_per_caller_and_a_closed_one_frees_its_place() {
    const B: &str = "spiffe://example.org/ns/b/sa/other";
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (B, "contoso", GRAPH)]),
        limits: "max_watches_per_caller = 2",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let mut client = h.client(Some(&a)).await.unwrap();
    let mut first = watch(&mut client, None).await.unwrap();
    next(&mut first).await.unwrap();
    let _second = watch(&mut client, None).await.unwrap();
    assert_status(
        watch(&mut client, None).await,
        Code::ResourceExhausted,
        &["2 watches open", "max_watches_per_caller"],
    );
    // Another caller has its own allowance.
    let b = h.ca.client(&[B]);
    watch(&mut h.client(Some(&b)).await.unwrap(), None)
        .await
        .unwrap();
    // Closing a watch (the client drops the stream) gives its place back once the broker
    // sees the stream reset.
    drop(first);
    let mut reopened = None;
    for _ in 0..300 {
        match watch(&mut client, None).await {
            Ok(w) => {
                reopened = Some(w);
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    next(&mut reopened.expect("a closed watch frees its place"))
        .await
        .unwrap();
    h.stop().await;
}

/// A certificate revoked after its handshake: new connections are refused at once, and a
/// watch it opened ends before its next token instead of running on until `notAfter`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_client_certificate_that_opened_it_is_revoked() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        crl: true,
        ..Default::default()
    })
    .await;
    let revoked = h.ca.client(&[A]);
    let kept = h.ca.client(&[A]);
    let mut w = watch(&mut h.client(Some(&revoked)).await.unwrap(), None)
        .await
        .unwrap();
    next(&mut w).await.unwrap().token.unwrap();

    std::fs::write(h.path("callers.crl"), h.ca.crl(2, &[&revoked])).unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    // A new token is published (asked for by the same identity on another certificate).
    force_refresh(&h, &kept).await;
    let end = next(&mut w).await.unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(
        end.message()
            .contains("client certificate is no longer accepted"),
        "{}",
        end.message()
    );
    let records = h.records();
    let ended = records
        .iter()
        .rfind(|r| r.rpc == "WatchToken")
        .expect("the watch's end is recorded");
    assert_eq!(
        (ended.outcome, ended.code),
        (Outcome::Denied, "UNAUTHENTICATED")
    );
    h.stop().await;
}

/// A watch opened with a trust domain's certificate ends once that domain's bundle no
/// longer vouches for it, though its CA is still trusted for another domain: the check of a
/// long-lived stream applies the same scoping as the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_its_trust_domains_bundle_no_longer_vouches_for_its_certificate() {
    const PROD: &str = "spiffe://prod.example/ns/a/sa/watcher";
    let prod = crate::pki::Ca::new("prod.example CA");
    let partner = crate::pki::Ca::new("partner.example CA");
    let h = Harness::start(Options {
        policy: grants(&[(PROD, "contoso", GRAPH)]),
        server: "trust_domain_ca_files = { \"prod.example\" = \"prod-ca.pem\", \"partner.example\" = \"partner-ca.pem\" }",
        files: vec![
            ("prod-ca.pem", prod.pem()),
            ("partner-ca.pem", partner.pem()),
        ],
        ..Default::default()
    })
    .await;
    let opened = prod.client(&[PROD]);
    let mut w = watch(&mut h.client(Some(&opened)).await.unwrap(), None)
        .await
        .unwrap();
    next(&mut w).await.unwrap().token.unwrap();

    // prod.example moves to a new CA; the old one stays trusted, for partner.example only.
    let next_prod = crate::pki::Ca::new("next prod.example CA");
    std::fs::write(h.path("prod-ca.pem"), next_prod.pem()).unwrap();
    std::fs::write(
        h.path("partner-ca.pem"),
        format!("{}{}", partner.pem(), prod.pem()),
    )
    .unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    // A new token is published (asked for by the same identity on the new CA's certificate).
    force_refresh(&h, &next_prod.client(&[PROD])).await;
    let end = next(&mut w).await.unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    for words in [
        "client certificate is no longer accepted",
        "names spiffe://prod.example/ns/a/sa/watcher but is not issued by trust domain prod.example's CA bundle (server.trust_domain_ca_files)",
    ] {
        assert!(end.message().contains(words), "{}", end.message());
    }
    h.stop().await;
}

/// The records of the watch `request_id` once `done` holds for them (the server learns of a
/// closed stream a moment after the client closes it), bounded.
async fn watch_records_until(
    h: &Harness,
    done: impl Fn(&[tokenbroker::audit::AuditRecord]) -> bool,
) -> Vec<tokenbroker::audit::AuditRecord> {
    for _ in 0..200 {
        let records: Vec<_> = h
            .records()
            .into_iter()
            .filter(|r| r.rpc == "WatchToken")
            .collect();
        if done(&records) {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the watch's records never came: {:?}", h.records());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_caller_closes_has_its_end_in_the_audit_trail() {
    let (h, _, w, _) = watching_a().await;
    drop(w);
    let records = watch_records_until(&h, |r| r.len() >= 3).await;
    let [admitted, sent, end] = records.as_slice() else {
        panic!("admission, the token sent and the end: {records:?}");
    };
    assert!(sent.token_fingerprint.is_some());
    assert_eq!(end.request_id, admitted.request_id, "{end:?}");
    assert_eq!((end.outcome, end.code), (Outcome::Cancelled, "CANCELLED"));
    assert_eq!(end.caller.as_deref(), Some(A));
    assert_eq!(end.tenant, "contoso");
    assert_eq!(end.token_fingerprint, None, "the end sends no token");
    assert!(
        end.reason.as_deref().unwrap().contains("closed the watch"),
        "{end:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_broker_ends_at_shutdown_has_its_end_in_the_audit_trail() {
    let (h, _, mut w, _) = watching_a().await;
    let audit = h.audit.clone();
    let stopped = tokio::spawn(h.stop());
    let end = tokio::time::timeout(Duration::from_secs(30), w.message())
        .await
        .expect("the watch ends at shutdown")
        .expect_err("with a status");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    drop(w);
    stopped.await.unwrap();
    let records: Vec<_> = audit
        .records()
        .into_iter()
        .filter(|r| r.rpc == "WatchToken")
        .collect();
    let [admitted, _sent, end] = records.as_slice() else {
        panic!("admission, the token sent and the end, once: {records:?}");
    };
    assert_eq!(end.request_id, admitted.request_id, "{end:?}");
    assert_eq!((end.outcome, end.code), (Outcome::Failed, "UNAVAILABLE"));
    assert!(
        end.reason.as_deref().unwrap().contains("shutting down"),
        "{end:?}"
    );
}
