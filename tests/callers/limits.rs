use tonic::Code;

use crate::harness::*;

const A: &str = "spiffe://example.org/ns/a/sa/greedy";
const B: &str = "spiffe://example.org/ns/b/sa/modest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_a_callers_limit_is_exhausted_while_another_caller_is_unaffected() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (B, "contoso", GRAPH)]),
        // So slow a refill that none happens during the test.
        limits: "caller_rate_per_sec = 0.001\ncaller_burst = 3",
        ..Default::default()
    })
    .await;
    let (a, b) = (h.ca.client(&[A]), h.ca.client(&[B]));
    for _ in 0..3 {
        h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    }
    let s = assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH]).await,
        Code::ResourceExhausted,
        &["rate"],
    );
    assert!(retry_after_secs(&s) >= 1, "{s:?}");
    for _ in 0..3 {
        h.get(Some(&b), None, "contoso", &[GRAPH]).await.unwrap();
    }
    let last = h.records().pop().unwrap();
    assert_eq!(last.caller.as_deref(), Some(B));
    let exhausted: Vec<_> = h
        .records()
        .into_iter()
        .filter(|r| r.code == "RESOURCE_EXHAUSTED")
        .collect();
    assert_eq!(exhausted.len(), 1);
    assert_eq!(exhausted[0].caller.as_deref(), Some(A));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_anything_else() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        limits: "max_request_bytes = 4096",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let big = "x".repeat(8 * 1024);
    assert_status(
        h.get(Some(&a), None, &big, &[GRAPH]).await,
        Code::OutOfRange,
        &["too large", "4096"],
    );
    // Never decoded, but audited: with the certificate's caller and no tenant.
    let r = h.audit.take();
    assert_eq!(r.len(), 1, "{r:#?}");
    assert_eq!(
        (r[0].code, r[0].caller.as_deref()),
        ("OUT_OF_RANGE", Some(A))
    );
    assert_eq!(r[0].tenant, "");
    // Nine scopes (more than the broker takes) are the caller's to fix.
    let nine: Vec<String> = (0..9).map(|i| format!("api://s{i}/.default")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    assert_status(
        h.get(Some(&a), None, "contoso", &nine).await,
        Code::InvalidArgument,
        &["scopes"],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_in_flight_limit_requests_are_shed_with_a_retry_hint() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (A, "fabrikam", GRAPH)]),
        limits: "max_in_flight = 1",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.fault(serde_json::json!({"route": "entra.token", "latency_ms": 3000, "count": 1}))
        .await;
    let held = h.spawn_get(&a, "contoso").await;
    // The one slot is held while the exchange waits at Entra.
    h.until_faults_spent("the held request reached Entra").await;
    let s = assert_status(
        h.get(Some(&a), None, "fabrikam", &[GRAPH]).await,
        Code::Unavailable,
        &["limit of requests in flight"],
    );
    assert_eq!(retry_after_secs(&s), 1);
    assert!(!held.is_finished(), "shed while the slot was held");
    held.await.unwrap().unwrap();
    // The slot is free again.
    h.get(Some(&a), None, "fabrikam", &[GRAPH]).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_callers_retry_hint_is_not_shorter_than_the_wait() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        // One request, then the next token 2.5 s later: a hint of 2 s would send the client
        // back while it is still over its rate.
        limits: "caller_rate_per_sec = 0.4\ncaller_burst = 1",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    let s = assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH]).await,
        Code::ResourceExhausted,
        &["rate"],
    );
    assert_eq!(retry_after_secs(&s), 3, "the wait rounded up: {s:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuers_callers_are_told_to_retry_when_its_keys_are_fetched_again() {
    // An issuer nobody answers for: a loopback port let go of.
    let gone = format!("http://{}", tokenbroker::bench::free_port().unwrap());
    let h = Harness::start(Options {
        policy: grants(&[("jwt:gone:svc-a", "contoso", GRAPH)]),
        issuers: vec![("gone", gone.clone())],
        ..Default::default()
    })
    .await;
    let mut claims = h.issuer.claims("svc-a");
    claims["iss"] = serde_json::json!(gone);
    let token = h.issuer.sign_with("key-1", &claims);
    // The fetch fails; the keys are not asked for again within jwks_min_refresh (30 s by
    // default), so a retry before then is refused the same: the hint covers that time.
    for _ in 0..2 {
        let s = assert_status(
            h.get(None, Some(&token), "contoso", &[GRAPH]).await,
            Code::Unavailable,
            &["issuer `gone`"],
        );
        let hint = retry_after_secs(&s);
        assert!((29..=30).contains(&hint), "{hint}: {s:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_the_tracked_number_are_refused_not_given_a_fresh_burst() {
    const C: &str = "spiffe://example.org/ns/c/sa/third";
    let h = Harness::start(Options {
        policy: grants(&[
            (A, "contoso", GRAPH),
            (B, "contoso", GRAPH),
            (C, "contoso", GRAPH),
        ]),
        // One request each, then none for 1000 s; two callers' buckets kept at once.
        limits: "caller_rate_per_sec = 0.001\ncaller_burst = 1\nmax_callers = 2",
        ..Default::default()
    })
    .await;
    let clients = [h.ca.client(&[A]), h.ca.client(&[B]), h.ca.client(&[C])];
    let mut served = [0; 3];
    let mut untracked = Vec::new();
    for _ in 0..40 {
        for (i, c) in clients.iter().enumerate() {
            match h.get(Some(c), None, "contoso", &[GRAPH]).await {
                Ok(_) => served[i] += 1,
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    if s.message().contains("limits.max_callers") {
                        assert!(retry_after_secs(&s) >= 1, "{s:?}");
                        untracked.push(i);
                    }
                }
            }
        }
    }
    assert!(
        served.iter().all(|&n| n <= 1),
        "no caller is served past its burst by being one too many: {served:?}"
    );
    assert_eq!(served, [1, 1, 0], "the first two are tracked");
    assert!(
        !untracked.is_empty() && untracked.iter().all(|&i| i == 2),
        "{untracked:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holds_at_most_its_share_of_in_flight_places_while_another_is_served() {
    let h = Harness::start(Options {
        policy: grants(&[
            (A, "contoso", GRAPH),
            (A, "fabrikam", GRAPH),
            (B, "contoso", CONTOSO_API),
        ]),
        // The per-caller bound left at its default (an eighth of the broker's: 2).
        limits: "max_in_flight = 16",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    // Two exchanges held at Entra: each holds a place of A's.
    h.fault(serde_json::json!({"route": "entra.token", "latency_ms": 3000, "count": 2}))
        .await;
    let held = vec![
        h.spawn_get(&a, "contoso").await,
        h.spawn_get(&a, "fabrikam").await,
    ];
    h.until_faults_spent("both held requests reached Entra")
        .await;
    let s = assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH]).await,
        Code::ResourceExhausted,
        &["limits.max_in_flight_per_caller", "2"],
    );
    assert_eq!(retry_after_secs(&s), 1);
    // Another caller is served meanwhile.
    let b = h.ca.client(&[B]);
    h.get(Some(&b), None, "contoso", &[CONTOSO_API])
        .await
        .unwrap();
    assert!(held.iter().all(|t| !t.is_finished()), "refused while held");
    for t in held {
        t.await.unwrap().unwrap();
    }
    // A's places are free again.
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}
