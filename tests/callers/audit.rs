use serde_json::Value;
use tokenbroker::audit::Outcome;
use tokenbroker::sensitive::fingerprint;
use tonic::Code;

use crate::harness::*;

const A: &str = "spiffe://example.org/ns/a/sa/reader";
const USER_READ: &str = "https://graph.microsoft.com/User.Read";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_one_record_with_the_token_fingerprint_and_never_the_token() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (A, "contoso", USER_READ)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let bearer = h.issuer.token("svc-z");
    let before = std::time::SystemTime::now();

    let first = h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    let second = h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    assert_status(
        h.get(Some(&a), None, "fabrikam", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    assert_status(
        h.get(None, Some(&bearer), "contoso", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    // Entra refuses a scope without /.default: a failure with Entra's correlation id.
    assert_status(
        h.get(Some(&a), None, "contoso", &[USER_READ]).await,
        Code::InvalidArgument,
        &[],
    );

    let r = h.records();
    assert_eq!(r.len(), 5, "{r:#?}");
    let ids: std::collections::HashSet<&str> = r.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), 5, "request ids are unique");

    let (exchange, cache) = (&r[0], &r[1]);
    assert_eq!(exchange.rpc, "GetToken");
    assert_eq!(exchange.caller.as_deref(), Some(A));
    assert_eq!(exchange.tenant, "contoso");
    assert_eq!(exchange.scopes, vec![GRAPH.to_string()]);
    assert_eq!(exchange.outcome, Outcome::Allowed);
    assert_eq!(exchange.code, "OK");
    assert_eq!(exchange.reason, None);
    assert_eq!(exchange.token_source, Some("EXCHANGE"));
    assert_eq!(cache.token_source, Some("CACHE"));
    assert_eq!(
        exchange.token_fingerprint.as_deref(),
        Some(fingerprint(first.access_token.as_bytes()).as_str())
    );
    assert_eq!(cache.token_fingerprint, exchange.token_fingerprint);
    assert_eq!(second.access_token, first.access_token);
    let expires = exchange
        .expires_at
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(
        expires.as_secs() as i64,
        first.expires_at.as_ref().unwrap().seconds
    );
    assert!(exchange.peer.unwrap().ip().is_loopback());
    assert!(exchange.time >= before, "stamped when recorded");

    let denied = &r[2];
    assert_eq!(denied.outcome, Outcome::Denied);
    assert_eq!(denied.code, "PERMISSION_DENIED");
    assert_eq!(denied.caller.as_deref(), Some(A));
    assert_eq!(denied.tenant, "fabrikam");
    assert_eq!(
        (
            denied.token_source,
            &denied.token_fingerprint,
            &denied.expires_at
        ),
        (None, &None, &None)
    );

    let jwt_denied = &r[3];
    assert_eq!(jwt_denied.caller.as_deref(), Some("jwt:test:svc-z"));
    assert_eq!(
        serde_json::to_value(jwt_denied.proof).unwrap(),
        Value::from("jwt")
    );

    let failed = &r[4];
    assert_eq!(failed.outcome, Outcome::Failed);
    assert_eq!(failed.code, "INVALID_ARGUMENT");
    assert!(
        failed.reason.as_deref().unwrap().contains("AADSTS"),
        "{failed:?}"
    );
    assert!(failed.entra_correlation_id.is_some(), "{failed:?}");

    // Nothing secret in the serialised trail.
    let trail = serde_json::to_string(&r).unwrap();
    assert!(!trail.contains(&first.access_token));
    assert!(!trail.contains(&bearer));
    assert!(!trail.contains("eyJ"), "no JWT of any kind: {trail}");
    h.stop().await;
}

/// A failure the broker remembers tells its callers how long (a countdown); the audit record
/// keeps the failure's own reason, the same for every request it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_failures_audit_reason_is_the_failure_without_its_countdown() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", USER_READ)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    // Entra refuses a scope without /.default: remembered as the request's fault.
    for _ in 0..2 {
        let e = h
            .get(Some(&a), None, "contoso", &[USER_READ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("(remembered: "), "{}", e.message());
    }
    let r = h.records();
    assert_eq!(r.len(), 2, "{r:#?}");
    let reason = r[0].reason.as_deref().unwrap();
    assert!(reason.contains("AADSTS"), "{reason}");
    assert!(!reason.contains("remembered"), "{reason}");
    assert_eq!(r[1].reason, r[0].reason);
    assert_eq!(r[1].entra_correlation_id, r[0].entra_correlation_id);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_returned_to_the_caller() {
    let h = Harness::start(Options::default()).await;
    let mut client = h.client(None).await.unwrap();
    let s = client
        .get_token(tokenbroker::proto::GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let id = s.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(h.records()[0].request_id, id);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_over_and_over_is_summarised_but_policy_denials_are_each_recorded() {
    const TRIES: usize = 300;
    const FORGED: &str = "forged-bearer-token-that-is-not-a-jwt";
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let mut client = h.client(None).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..TRIES {
        let mut req = tonic::Request::new(tokenbroker::proto::GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {FORGED}").parse().unwrap());
        let s = client.get_token(req).await.unwrap_err();
        // After `failed_auth_burst` failures the address is held back without a check.
        assert!(
            matches!(s.code(), Code::Unauthenticated | Code::ResourceExhausted),
            "{s:?}"
        );
        ids.push(
            s.metadata()
                .get("x-request-id")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    let a = h.ca.client(&[A]);
    for tenant in ["fabrikam", "northwind", "fabrikam"] {
        assert_status(
            h.get(Some(&a), None, tenant, &[GRAPH]).await,
            Code::PermissionDenied,
            &[],
        );
    }

    // The server writes the summary once its window closes, without waiting for shutdown.
    let refusals = |r: &[tokenbroker::audit::AuditRecord]| -> Vec<_> {
        r.iter()
            .filter(|r| ["UNAUTHENTICATED", "RESOURCE_EXHAUSTED"].contains(&r.code))
            .cloned()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while requests_in(&refusals(&h.records())) < TRIES as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no summary written: {:#?}",
            h.records()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = h.records();
    let refused = refusals(&r);
    assert_eq!(requests_in(&refused), TRIES as u64, "{refused:#?}");
    // A group writes its first refusal of a one-second window and then a summary: with the
    // summary of the window before, at most three records of a group fall in any second.
    let mut per_second: std::collections::HashMap<(&str, u64), usize> = Default::default();
    for r in &refused {
        let second = r
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        *per_second.entry((r.code, second)).or_default() += 1;
    }
    assert!(
        per_second.values().all(|&n| n <= 3),
        "records per code and second: {per_second:?}"
    );
    assert_eq!(
        refused[0].request_id, ids[0],
        "the first refusal is written as it is"
    );
    assert_eq!(refused[0].repeats, None);
    let summary = refused.iter().find(|r| r.repeats.is_some()).unwrap();
    assert!(summary.repeats.unwrap() >= 2, "{summary:?}");
    assert!(ids.contains(&summary.request_id));
    assert!(summary.peer.unwrap().ip().is_loopback());
    assert_eq!(summary.caller, None);
    assert!(
        summary.reason.as_deref().unwrap().contains("bearer token"),
        "{summary:?}"
    );
    assert!(
        refused
            .iter()
            .all(|r| r.outcome == Outcome::Denied && r.caller.is_none()),
        "{refused:#?}"
    );

    let denied: Vec<_> = r.iter().filter(|r| r.code == "PERMISSION_DENIED").collect();
    assert_eq!(
        denied.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>(),
        ["fabrikam", "northwind", "fabrikam"],
        "every policy denial is its own record"
    );
    assert!(denied.iter().all(|r| r.repeats.is_none()));

    let trail = serde_json::to_string(&h.stop_and_records().await).unwrap();
    assert!(!trail.contains(FORGED), "no credential in the trail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_caller_gives_up_on_is_recorded_as_cancelled() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // Entra answers in 20 s; the caller waits 300 ms for its token.
    h.fault(serde_json::json!({"route": "entra.token", "latency_ms": 20000, "count": 1}))
        .await;
    let a = h.ca.client(&[A]);
    let mut req = tonic::Request::new(tokenbroker::proto::GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    });
    req.set_timeout(std::time::Duration::from_millis(300));
    let s = h
        .client(Some(&a))
        .await
        .unwrap()
        .get_token(req)
        .await
        .unwrap_err();
    // The broker's answer to a passed deadline, or the client's own.
    assert!(
        matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{s:?}"
    );
    let mut cancelled = None;
    for _ in 0..100 {
        cancelled = h
            .records()
            .into_iter()
            .find(|r| r.outcome == Outcome::Cancelled);
        if cancelled.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = cancelled.expect("the request the caller gave up on is in the audit trail");
    assert_eq!(r.code, "CANCELLED");
    assert_eq!(r.caller.as_deref(), Some(A));
    assert_eq!(
        (r.tenant.as_str(), r.scopes.as_slice()),
        ("contoso", &[GRAPH.to_string()][..])
    );
    assert!(!r.request_id.is_empty());
    assert!(r.reason.unwrap().contains("before the answer"));
    assert_eq!(r.token_fingerprint, None, "no token went out");
    assert_eq!(
        h.records().len(),
        1,
        "one record for the request: {:?}",
        h.records()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_at_shutdown_is_recorded_as_cancelled_by_the_shutdown_before_serving_returns()
{
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        server: "shutdown_grace_secs = 1",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    // Entra answers long after the drain bound.
    h.fault(serde_json::json!({"route": "entra.token", "latency_ms": 60000, "count": 1}))
        .await;
    let held = h.spawn_get(&a, "contoso").await;
    h.until_faults_spent("the held request reached Entra").await;
    let records = h.stop_and_records().await;
    assert!(held.await.unwrap().is_err());
    let cancelled: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Cancelled)
        .collect();
    assert_eq!(cancelled.len(), 1, "{records:#?}");
    assert_eq!(cancelled[0].caller.as_deref(), Some(A));
    assert_eq!(cancelled[0].code, "CANCELLED");
    let reason = cancelled[0].reason.as_deref().unwrap_or_default();
    assert!(reason.contains("shutting down"), "{reason}");
}

/// The sum of `tokenbroker_request_duration_seconds` for GetToken requests that succeeded.
async fn get_token_seconds(h: &Harness) -> f64 {
    let text = h.metrics().await;
    text.lines()
        .find(|l| {
            l.starts_with("tokenbroker_request_duration_seconds_sum{")
                && l.contains(r#"method="GetToken""#)
                && l.contains(r#"outcome="ok""#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no GetToken duration sum in\n{text}"))
}

// A request is answered only once its audit record is written, which blocks while the
// audit output is slow: its recorded duration includes that wait, as its caller saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_duration_includes_the_audit_write() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    let before = get_token_seconds(&h).await;
    let delay = std::time::Duration::from_secs(1);
    h.audit.set_write_delay(Some(delay));
    // Served from the cache: the request itself takes milliseconds.
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    h.audit.set_write_delay(None);
    let recorded = get_token_seconds(&h).await - before;
    assert!(
        recorded >= delay.as_secs_f64(),
        "recorded {recorded} s for a request whose audit write took {delay:?}"
    );
    h.stop().await;
}
