//! Resilience, end to end against the emulator with a manual clock: refresh ahead, serving
//! still-valid tokens through outages, throttling, breakers and negative caching,
//! certificate rotation, WatchToken across refreshes. Time moves only when a test says so
//! (`Stack::advance` moves the broker's clock and the emulator's together).

#[path = "../broker/helpers.rs"]
mod helpers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helpers::*;
use serde_json::json;
use tokenbroker::clock::ManualClock;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::entra::{EntraError, EntraErrorClass, EntraToken, ExchangeRequest, TokenExchange};
use tokenbroker::proto::{GetTokenRequest, TokenSource, WatchTokenRequest};
use tonic::Code;

const MIN: Duration = Duration::from_secs(60);

/// The demo estate with a fixed 60-minute token lifetime, so refresh times are predictable.
fn estate() -> EmulatorConfig {
    estate_living(3600)
}

/// The demo estate with every token issued for `secs`.
fn estate_living(secs: u64) -> EmulatorConfig {
    let mut emu = EmulatorConfig::demo();
    for t in &mut emu.tenants {
        for a in &mut t.apps {
            a.token_lifetime_secs = [secs, secs];
        }
    }
    emu
}

/// Refresh at a quarter of the lifetime (9 to 15 minutes), and the given extra settings.
fn tuned(extra: &'static str) -> impl FnOnce(String) -> String {
    move |t| {
        format!(
            "{t}\n[cache]\nrefresh_fraction = 0.25\ncertificate_refresh_secs = 600\n\n[resilience]\n{extra}\n"
        )
    }
}

async fn manual(extra: &'static str) -> Stack {
    Stack::start_full(estate(), tuned(extra), Some(ManualClock::new()), |e| e).await
}

/// Contoso Graph's cache slot.
async fn slot_of(stack: &Stack) -> Arc<tokenbroker::cache::Slot<tokenbroker::flow::FlowError>> {
    let key = stack.broker.key("contoso", &[GRAPH.into()]).unwrap();
    stack.broker.cache().slot(&key, || key.clone()).await
}

/// Whether contoso Graph's slot has published a failed fetch and has none under way. A
/// fetch's failure is counted before its slot publishes it, and only a published failure
/// makes the cached token stale.
async fn failure_published(stack: &Stack) -> bool {
    let slot = slot_of(stack).await;
    slot.current().failure.is_some() && slot.flight().is_none()
}

/// A `WatchToken` stream for `tenant` and Graph.
async fn watch(
    stack: &Stack,
    tenant: &str,
) -> tonic::Streaming<tokenbroker::proto::WatchTokenResponse> {
    stack
        .client()
        .await
        .watch_token(WatchTokenRequest {
            tenant: tenant.into(),
            scopes: vec![GRAPH.into()],
        })
        .await
        .unwrap()
        .into_inner()
}

/// A GetToken for `tenant` and Graph, running in the background.
async fn spawn_get(
    stack: &Stack,
    tenant: &str,
) -> tokio::task::JoinHandle<
    Result<tonic::Response<tokenbroker::proto::GetTokenResponse>, tonic::Status>,
> {
    let mut c = stack.client().await;
    let tenant = tenant.to_owned();
    tokio::spawn(async move {
        c.get_token(GetTokenRequest {
            tenant,
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
    })
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().unwrap().seconds
}

async fn watch_next(
    stream: &mut tonic::Streaming<tokenbroker::proto::WatchTokenResponse>,
) -> tokenbroker::proto::WatchTokenResponse {
    // A bound so a broken refresh fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("a watch message within the bound")
        .unwrap()
        .expect("the stream stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_minute_entra_outage_fails_no_request_for_still_valid_tokens() {
    let stack = manual("").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let mut watch = watch(&stack, "contoso").await;
    let watched = watch_next(&mut watch).await.token.unwrap();
    assert_eq!(watched.access_token, first.access_token);
    assert_eq!(
        watched.source,
        TokenSource::Cache as i32,
        "cached before the watch"
    );

    stack.entra_outage().await;
    for _ in 0..30 {
        stack.advance(MIN).await;
        let r = stack
            .get("contoso", GRAPH)
            .await
            .expect("no failed request during the outage");
        assert_eq!(r.access_token, first.access_token);
    }
    // Past the refresh time the token is served as stale, once a failed refresh is published
    // (on a starved CPU, possibly only after the loop's callers looked).
    wait_for(|| async { slot_of(&stack).await.current().failure.is_some() }).await;
    let r = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(r.access_token, first.access_token);
    assert_eq!(r.source, TokenSource::StaleWhileRefreshFailing as i32);
    assert!(stack.broker.stats().stale_served.get() > 0);

    // Recovery: the next background attempt replaces the token.
    stack.clear_faults().await;
    advance_until(&stack, &mut watch, |m| {
        !m.refresh_failing && m.token.as_ref().unwrap().access_token != first.access_token
    })
    .await;
    let after = stack.get("contoso", GRAPH).await.unwrap();
    assert_ne!(after.access_token, first.access_token);
    assert_eq!(after.source, TokenSource::Cache as i32);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_asking_no_minimum_are_served_through_an_outage_down_to_the_safety_margin() {
    // One attempt per fetch: a fetch fails at once instead of backing off on the manual clock.
    let stack = manual("max_attempts = 1").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    stack.entra_outage().await;
    let stats = stack.broker.stats();
    let mut c = stack.client().await;
    let asking = |min: u64| GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        min_validity: Some(prost_types::Duration {
            seconds: min as i64,
            nanos: 0,
        }),
        force_refresh: false,
        ..Default::default()
    };
    // 55 minutes in, every refresh since the first (at 9 to 15 minutes) failed: 300 s are
    // left, the default minimum validity; then a minute at a time down to the safety margin.
    for (step, left) in [
        (55 * MIN, 300),
        (MIN, 240),
        (MIN, 180),
        (MIN, 120),
        (MIN, 60),
    ] {
        let refreshes = stats.refreshes.get();
        stack.advance(step).await;
        // The key's background refresh retries once a minute at most: its attempt for this
        // minute, then the callers'.
        wait_for(|| async {
            stats.refreshes.get() > refreshes
                && stats.refresh_failures.get() == stats.refreshes.get()
                && failure_published(&stack).await
        })
        .await;
        let asked = stack.route_total("entra.token").await;
        let misses = stats.misses.get();
        for _ in 0..5 {
            let r = stack
                .get("contoso", GRAPH)
                .await
                .unwrap_or_else(|e| panic!("{left}s left: {e:?}"));
            assert_eq!(r.access_token, first.access_token);
            assert_eq!(r.source, TokenSource::StaleWhileRefreshFailing as i32);
        }
        assert_eq!(
            stack.route_total("entra.token").await,
            asked,
            "{left}s left: callers served the cached token ask Entra nothing"
        );
        assert_eq!(stats.misses.get(), misses, "nor wait for a fetch");
        // A caller that asked for 300 s is served only while the token has them.
        let explicit = c.get_token(asking(300)).await;
        if left >= 300 {
            assert_eq!(
                explicit.unwrap().into_inner().access_token,
                first.access_token
            );
        } else {
            assert_eq!(
                explicit.unwrap_err().code(),
                Code::Unavailable,
                "{left}s left"
            );
        }
    }
    // Below the safety margin, nobody gets the token.
    stack.advance(Duration::from_secs(1)).await;
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(stats.stale_served.get() >= 25);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_throttling_honours_retry_after_and_valid_tokens_keep_flowing() {
    let stack = manual("retry_budget_secs = 60").await;
    let warm = stack.get("fabrikam", GRAPH).await.unwrap();
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 1, "fail": {"status": 429, "retry_after": 30}}),
        )
        .await;
    let signs_before = stack.total_signs().await;
    let routed_before = stack.route_total("keyvault.sign").await;
    let cold = spawn_get(&stack, "contoso").await;
    // The throttled sign is not retried before Retry-After has passed on the clock.
    wait_for(|| async {
        faults_left(&stack).await == 0 && stack.route_total("keyvault.sign").await > routed_before
    })
    .await;
    let attempts = stack.route_total("keyvault.sign").await;
    assert_eq!(
        stack.total_signs().await,
        signs_before,
        "no successful sign yet"
    );
    // Meanwhile a caller with a valid cached token sees no error.
    let again = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(again.access_token, warm.access_token);
    // Past the longest backoff (8 s), short of Retry-After (30 s): a broker that ignored
    // Retry-After would retry now.
    stack.advance(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stack.route_total("keyvault.sign").await,
        attempts,
        "no retry before Retry-After"
    );
    assert!(!cold.is_finished(), "the cold caller still waits");
    stack.advance(Duration::from_secs(21)).await;
    let r = cold.await.unwrap().expect("succeeds after Retry-After");
    assert_eq!(r.into_inner().tenant_id, demo::CONTOSO_TENANT);
    assert_eq!(stack.total_signs().await, signs_before + 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_rate_stays_under_the_configured_budget() {
    // 1 sign per second per vault, burst 1; two cold tenants sign on the same vault.
    let stack = manual("sign_rate_per_vault = 1.0\nsign_burst = 1\nretry_budget_secs = 30").await;
    stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(stack.total_signs().await, 1);
    let second = spawn_get(&stack, "fabrikam").await;
    // The burst is spent and the clock stands still: fabrikam's sign waits for the budget.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stack.total_signs().await,
        1,
        "no second sign within the second"
    );
    assert!(
        !second.is_finished(),
        "the second tenant waits for the budget"
    );
    stack.advance(Duration::from_secs(1)).await;
    second.await.unwrap().unwrap();
    assert_eq!(stack.total_signs().await, 2);
    stack.stop().await;
}

async fn faults_left(stack: &Stack) -> usize {
    let v = stack.faults().await;
    // Spent faults stay listed, marked `spent`.
    v["faults"]
        .as_array()
        .expect("GET /faults lists {\"faults\": [...]}")
        .iter()
        .filter(|f| f["spent"] != true)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cold_requests_over_a_hundred_tenants_cost_a_hundred_of_each() {
    // One multi-tenant app, consented in 100 tenants, one certificate.
    let mut emu = EmulatorConfig::demo();
    let template = emu.tenants[1].clone();
    emu.tenants = (0..100)
        .map(|i| {
            let mut t = template.clone();
            t.tenant_id = format!("7e7e7e7e-0000-4000-8000-{i:012}");
            t.domain = Some(format!("t{i}.onmicrosoft.com"));
            t
        })
        .collect();
    let stack = Stack::start_with(emu, |t| {
        // Room for all 10,000 at once (the dev configuration's per-caller limits are high).
        let t = t
            .replace("[limits]\n", "[limits]\nmax_in_flight = 20000\n")
            .replace(
                "max_in_flight_per_caller = 4096",
                "max_in_flight_per_caller = 20000",
            );
        format!("{t}\n[resilience]\nsign_rate_per_vault = 1000.0\nsign_burst = 200\nexchange_burst = 200\n")
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(stack.client().await);
    }
    let calls = (0..10_000).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        async move {
            c.get_token(GetTokenRequest {
                tenant: format!("t{}", i % 100),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            })
            .await
            .map(|_| ())
        }
    });
    let results = futures::future::join_all(calls).await;
    assert!(
        results.iter().all(|r| r.is_ok()),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let counters = stack.counters().await;
    let signs: u64 = counters["sign"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    // A first attempt left unanswered for half the retry budget is asked again (a fresh
    // assertion, a second exchange): on a starved machine an answer can take that long. Each
    // such retry may cost one more sign and one more exchange; without any, exactly one each.
    let retries = stack
        .broker
        .upstream_stats()
        .retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (100..=100 + retries).contains(&signs),
        "{signs} signs, {retries} retries"
    );
    let exchanges = counters["exchanges"].as_object().unwrap();
    assert_eq!(exchanges.len(), 100);
    let totals: Vec<u64> = exchanges
        .values()
        .map(|v| v["total"].as_u64().unwrap())
        .collect();
    assert!(
        totals.iter().all(|&n| n >= 1) && totals.iter().sum::<u64>() <= 100 + retries,
        "{exchanges:?}, {retries} retries"
    );
    stack.stop().await;
}

/// Refuses assertions whose `x5t` is not the allowed one, as Entra does once an old
/// certificate has been removed from the app.
#[derive(Debug)]
struct RejectOtherKeys {
    inner: Arc<dyn TokenExchange>,
    allowed: Arc<Mutex<Option<String>>>,
}

#[async_trait::async_trait]
impl TokenExchange for RejectOtherKeys {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        let allowed = self.allowed.lock().unwrap().clone();
        let header = jsonwebtoken::decode_header(req.assertion.expose()).unwrap();
        if let Some(a) = allowed
            && header.x5t.as_deref() != Some(a.as_str())
        {
            return Err(EntraError {
                class: EntraErrorClass::KeyRejected,
                status: 401,
                error: "invalid_client".into(),
                codes: vec![700027],
                description: "AADSTS700027: Client assertion failed signature validation.".into(),
                correlation_id: Some(req.correlation_id.to_string()),
                trace_id: None,
                retry_after: None,
            });
        }
        self.inner.exchange(req).await
    }
}

/// Rotates contoso's certificate in the emulated vault; returns the new version's `x5t`.
/// `register_on_apps = false` leaves the app without the new public part.
async fn rotate_contoso(stack: &Stack, register_on_apps: bool) -> String {
    let rotated = stack
        .admin_post(
            &format!("/vaults/{}/certificates/contoso-app/rotate", demo::VAULT),
            json!({ "register_on_apps": register_on_apps }),
        )
        .await;
    rotated["x5t"].as_str().unwrap().to_owned()
}

/// Moves the clock a minute at a time, asking for contoso's token each minute; every
/// request must succeed.
async fn ask_every_minute(stack: &Stack, minutes: u32) {
    for _ in 0..minutes {
        stack.advance(MIN).await;
        stack
            .get("contoso", GRAPH)
            .await
            .expect("zero failed requests");
    }
}

fn x5t_of(assertion: &str) -> String {
    jsonwebtoken::decode_header(assertion).unwrap().x5t.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_used_on_the_next_refresh_without_failures() {
    let stack = manual("").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let old = x5t_of(&stack.assertions.lock().unwrap()[0]);
    let new = rotate_contoso(&stack, true).await;
    assert_ne!(old, new);
    let mut watch = watch(&stack, "contoso").await;
    watch_next(&mut watch).await;
    // Past the certificate metadata refresh (10 min) and the token refresh (9-15 min).
    ask_every_minute(&stack, 16).await;
    loop {
        let m = watch_next(&mut watch).await;
        if m.token.unwrap().access_token != first.access_token {
            break;
        }
    }
    let last = stack.assertions.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        x5t_of(&last),
        new,
        "the refresh signed with the new version"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_rejecting_the_old_key_refreshes_metadata_at_once_and_retries_once() {
    let allowed = Arc::new(Mutex::new(None));
    let gate = allowed.clone();
    let stack = Stack::start_full(
        estate(),
        tuned(""),
        Some(ManualClock::new()),
        move |inner| {
            Arc::new(RejectOtherKeys {
                inner,
                allowed: gate,
            })
        },
    )
    .await;
    stack.get("contoso", GRAPH).await.unwrap();
    let reads_before = stack
        .broker
        .upstream_stats()
        .certificate_reads
        .load(std::sync::atomic::Ordering::Relaxed);
    let new = rotate_contoso(&stack, true).await;
    *allowed.lock().unwrap() = Some(new.clone());
    // Metadata is still fresh (no periodic refresh yet): a forced refresh signs with the old
    // key, Entra refuses it, the broker re-reads the certificate and retries once.
    let r = stack
        .force_refresh("contoso", GRAPH)
        .await
        .expect("the single retry with the new key succeeds");
    assert_eq!(r.source, TokenSource::Exchange as i32);
    let seen = stack.assertions.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "first token, the refused attempt, the retry");
    assert_ne!(x5t_of(&seen[1]), new);
    assert_eq!(x5t_of(&seen[2]), new);
    let reads_after = stack
        .broker
        .upstream_stats()
        .certificate_reads
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        reads_after,
        reads_before + 1,
        "one immediate metadata refresh"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_app_fails_fast_from_the_negative_cache_while_others_are_unaffected() {
    let stack = manual("negative_ttl_secs = 30").await;
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
    for _ in 0..20 {
        let e = stack.get("contoso", GRAPH).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("AADSTS7000112"), "{}", e.message());
        stack
            .get("fabrikam", GRAPH)
            .await
            .expect("other tenants unaffected");
    }
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        1,
        "Entra is asked once per negative-cache period"
    );
    stack.advance(Duration::from_secs(31)).await;
    stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        2
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_keys_callers_share_the_failure_for_its_retry_after() {
    let stack = manual("").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100000, "fail": {"status": 429, "retry_after": 30}}),
        )
        .await;
    let retry_after = |e: &tonic::Status| {
        e.metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // Beyond the fetch's budget (10 s): told at once, with the hint.
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(retry_after(&e).as_deref(), Some("30"));
    let asked = stack.route_total("entra.token").await;
    // Each caller is told the time left of the hold-off, not the original hint.
    for left in [25, 20, 15, 10, 5] {
        stack.advance(Duration::from_secs(5)).await;
        let again = stack.get("contoso", GRAPH).await.unwrap_err();
        assert_eq!(again.code(), Code::Unavailable, "{again:?}");
        assert_eq!(retry_after(&again), Some(left.to_string()));
    }
    assert_eq!(
        stack.route_total("entra.token").await,
        asked,
        "no exchange within the Retry-After"
    );
    stack.clear_faults().await;
    stack.advance(Duration::from_secs(6)).await;
    let r = stack
        .get("contoso", GRAPH)
        .await
        .expect("fetched once the Retry-After has passed");
    assert_eq!(r.source, TokenSource::Exchange as i32);
    assert_eq!(stack.route_total("entra.token").await, asked + 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_token_delivers_each_refresh_before_expiry_and_survives_an_outage() {
    let stack = manual("").await;
    let mut watch = watch(&stack, "contoso").await;
    let mut current = watch_next(&mut watch).await.token.unwrap();
    assert_eq!(
        current.source,
        TokenSource::Exchange as i32,
        "fetched for the watch"
    );
    for cycle in 0..3 {
        let until_refresh = secs(&current.refresh_at) - now_unix(&stack);
        stack
            .advance(Duration::from_secs(until_refresh.max(0) as u64 + 1))
            .await;
        let next = watch_refreshed(&stack, &mut watch).await.token.unwrap();
        assert_ne!(next.access_token, current.access_token, "cycle {cycle}");
        assert_eq!(next.source, TokenSource::Exchange as i32);
        assert!(
            secs(&current.expires_at) > now_unix(&stack),
            "the new token arrives while the old one is still valid"
        );
        current = next;
    }
    // An outage: the stream stays open, reports the failure, keeps the last valid token.
    stack.entra_outage().await;
    let until_refresh = secs(&current.refresh_at) - now_unix(&stack);
    stack
        .advance(Duration::from_secs(until_refresh.max(0) as u64 + 1))
        .await;
    // The refresh retries on the clock; keep time moving until it gives up and says so.
    let failing = advance_until(&stack, &mut watch, |m| m.refresh_failing).await;
    assert!(!failing.last_error.is_empty());
    let stale = failing.token.unwrap();
    assert_eq!(stale.access_token, current.access_token);
    assert_eq!(stale.source, TokenSource::StaleWhileRefreshFailing as i32);
    // The outage outlasts the token: once expired, it is no longer sent.
    let to_expiry = secs(&current.expires_at) - now_unix(&stack);
    stack
        .advance(Duration::from_secs(to_expiry.max(0) as u64 + 1))
        .await;
    let gone = advance_until(&stack, &mut watch, |m| {
        if let Some(t) = &m.token {
            assert!(
                secs(&t.expires_at) > now_unix(&stack),
                "an expired token was sent"
            );
        }
        m.token.is_none()
    })
    .await;
    assert!(gone.refresh_failing && !gone.last_error.is_empty());
    stack.clear_faults().await;
    let recovered = advance_until(&stack, &mut watch, |m| !m.refresh_failing).await;
    assert_ne!(recovered.token.unwrap().access_token, current.access_token);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_once_that_refreshing_fails_not_of_each_failed_retry() {
    let stack = manual("max_attempts = 1").await;
    let mut watch = watch(&stack, "contoso").await;
    let first = watch_next(&mut watch).await.token.unwrap();
    stack.entra_outage().await;
    let until_refresh = secs(&first.refresh_at) - now_unix(&stack);
    stack
        .advance(Duration::from_secs(until_refresh.max(0) as u64 + 1))
        .await;
    let failures = || stack.broker.stats().refresh_failures.get();
    let before = failures();
    // Minutes of outage, the refresh retried at least once a minute, until it has failed
    // five times. Every message sent meanwhile is collected. Each minute's retry is given
    // time to fail (on a starved CPU a fetch takes seconds; it may also fall due only at the
    // next minute, if its wait began after the clock moved).
    let mut messages = Vec::new();
    for minute in 0.. {
        if failures() - before >= 5 {
            break;
        }
        assert!(
            minute < 60,
            "{} failed refreshes in an hour",
            failures() - before
        );
        let seen = failures();
        stack.advance(MIN).await;
        for _ in 0..250 {
            if failures() > seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(200), watch.message()).await {
            messages.push(m.unwrap().expect("the stream stays open"));
        }
    }
    let failed = failures() - before;
    assert_eq!(
        messages.len(),
        1,
        "one message when refreshing started to fail, not one per failed retry ({failed}): {:?}",
        messages
            .iter()
            .map(|m| m.refresh_failing)
            .collect::<Vec<_>>()
    );
    assert!(messages[0].refresh_failing && !messages[0].last_error.is_empty());
    assert!(
        !messages[0].last_error.contains("remembered"),
        "an outage is not remembered: {}",
        messages[0].last_error
    );
    let stale = messages[0].token.as_ref().unwrap();
    assert_eq!(stale.access_token, first.access_token);
    // The outage ends: the next message is the new token.
    stack.clear_faults().await;
    let next = advance_until(&stack, &mut watch, |_| true).await;
    assert!(!next.refresh_failing, "{next:?}");
    let new = next.token.unwrap();
    assert_ne!(new.access_token, first.access_token);
    assert_eq!(new.source, TokenSource::Exchange as i32);
    stack.stop().await;
}

/// A watcher of a key whose configuration Entra refuses is told, as a `GetToken` caller is,
/// that the refusal is remembered and how long the key goes unasked: a later refusal sends
/// no message of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_is_told_how_long_a_refusal_is_remembered() {
    let stack = manual("max_attempts = 1\nnegative_ttl_secs = 300").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100000,
                "fail": app_not_found()}),
        )
        .await;
    let told = |left: &str| {
        format!(
            "(remembered: this tenant and these scopes are not asked for again for {left}; SIGHUP the broker to ask at once)"
        )
    };
    let mut watching = watch(&stack, "contoso").await;
    let m = watch_next(&mut watching).await;
    assert!(m.token.is_none() && m.refresh_failing, "{m:?}");
    assert!(m.last_error.contains("AADSTS700016"), "{}", m.last_error);
    assert!(m.last_error.ends_with(&told("5m 0s")), "{}", m.last_error);
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().ends_with(&told("5m 0s")), "{}", e.message());
    // A watcher arriving later is told the time left.
    stack.advance(MIN).await;
    let mut later = watch(&stack, "contoso").await;
    let m = watch_next(&mut later).await;
    assert!(m.last_error.ends_with(&told("4m 0s")), "{}", m.last_error);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_is_told_when_an_outage_turns_into_a_remembered_refusal() {
    let stack = manual("max_attempts = 1\nnegative_ttl_secs = 300").await;
    stack.entra_outage().await;
    let mut watching = watch(&stack, "contoso").await;
    let m = watch_next(&mut watching).await;
    assert!(m.token.is_none() && m.refresh_failing, "{m:?}");
    assert!(!m.last_error.contains("remembered"), "{}", m.last_error);
    // Entra now refuses the app: the watched key's next retry is refused for good.
    stack.clear_faults().await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 100000,
                "fail": app_not_found()}),
        )
        .await;
    let told = tokio::spawn(async move { watch_next(&mut watching).await });
    // The watched key's retry waits for its backoff (at most 2 s) on the broker's clock.
    for _ in 0..20 {
        if told.is_finished() {
            break;
        }
        stack.advance(Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = told.await.unwrap();
    assert!(m.token.is_none() && m.refresh_failing, "{m:?}");
    assert!(m.last_error.contains("AADSTS700016"), "{}", m.last_error);
    assert!(m.last_error.contains("(remembered: "), "{}", m.last_error);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forced_refresh_leaves_a_healthy_cached_token_healthy() {
    let stack = manual("max_attempts = 1").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let mut watching = watch(&stack, "contoso").await;
    assert!(!watch_next(&mut watching).await.refresh_failing);
    stack.entra_outage().await;
    // The caller is told the truth: no new token (the cached one is what it wants replaced).
    let e = stack.force_refresh("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    stack.clear_faults().await;
    let r = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(r.access_token, first.access_token);
    assert_eq!(
        r.source,
        TokenSource::Cache as i32,
        "not stale: its refresh is not failing"
    );
    assert_eq!(stack.broker.stats().stale_served.get(), 0);
    let mut later = watch(&stack, "contoso").await;
    let m = watch_next(&mut later).await;
    assert!(!m.refresh_failing && m.last_error.is_empty(), "{m:?}");
    // The first watcher was told nothing of it: its next message is the scheduled refresh.
    let until_refresh = secs(&first.refresh_at) - now_unix(&stack);
    stack
        .advance(Duration::from_secs(until_refresh.max(0) as u64 + 1))
        .await;
    let next = watch_refreshed(&stack, &mut watching).await;
    assert!(!next.refresh_failing, "{next:?}");
    assert_ne!(next.token.unwrap().access_token, first.access_token);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_refresh_while_the_refresh_fails_is_answered_with_the_failure_not_the_old_token() {
    let stack = manual("max_attempts = 1").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    stack.entra_outage().await;
    let until_refresh = secs(&first.refresh_at) - now_unix(&stack);
    stack
        .advance(Duration::from_secs(until_refresh.max(0) as u64 + 1))
        .await;
    wait_for(|| async {
        stack.broker.stats().refresh_failures.get() >= 1 && failure_published(&stack).await
    })
    .await;
    let asked = stack.route_total("entra.token").await;
    // Callers that force a refresh, again and again, share the refresh's held failure: none
    // is handed back the token it asked to replace, and none costs Entra a request.
    for _ in 0..3 {
        let e = stack.force_refresh("contoso", GRAPH).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    assert_eq!(stack.route_total("entra.token").await, asked);
    // A caller that did not force a refresh is served the old token, said to be stale.
    let r = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(r.access_token, first.access_token);
    assert_eq!(r.source, TokenSource::StaleWhileRefreshFailing as i32);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_stepped_back_neither_delays_the_refresh_nor_misreports_the_expiry() {
    let stack = manual("").await;
    let clock = stack.clock.clone().unwrap();
    let mut watch = watch(&stack, "contoso").await;
    let first = watch_next(&mut watch).await.token.unwrap();
    let until_refresh = secs(&first.refresh_at) - now_unix(&stack);
    let until_expiry = secs(&first.expires_at) - now_unix(&stack);
    assert!(until_refresh > 0 && until_expiry > until_refresh);

    // The host's clock is stepped back four minutes (within Entra's skew allowance, so the
    // broker's assertions still pass).
    use tokenbroker::clock::Clock;
    clock.set_wall(clock.now() - Duration::from_secs(240));
    let served = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(served.access_token, first.access_token);
    assert_eq!(served.source, TokenSource::Cache as i32);
    // Its times are told in the stepped clock's time: a caller reading its own clock must
    // not be told the token lives four minutes longer than it does.
    let left = secs(&served.expires_at) - now_unix(&stack);
    assert!(
        (until_expiry - 1..=until_expiry).contains(&left),
        "expires in {left}s by the response, {until_expiry}s in fact"
    );
    assert!(secs(&served.refresh_at) - now_unix(&stack) <= until_refresh);

    // The refresh comes when the token's refresh time has passed, not four minutes later.
    stack
        .advance(Duration::from_secs(until_refresh as u64 + 1))
        .await;
    let next = watch_refreshed(&stack, &mut watch).await.token.unwrap();
    assert_ne!(next.access_token, first.access_token);
    stack.stop().await;
}

/// The next watch message after the clock was moved to a refresh. The refresh runs on the
/// broker's clock: should an upstream call fail on the way (a pooled connection closed under
/// load, say), its retry waits on that clock too, so time keeps moving a second at a time
/// while we wait, as it would. On failure, says what the broker did meanwhile.
async fn watch_refreshed(
    stack: &Stack,
    stream: &mut tonic::Streaming<tokenbroker::proto::WatchTokenResponse>,
) -> tokenbroker::proto::WatchTokenResponse {
    for _ in 0..12 {
        if let Ok(m) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            return m.unwrap().expect("the stream stays open");
        }
        stack.advance(Duration::from_secs(1)).await;
    }
    panic!("no refreshed token: {}", broker_counts(stack).await);
}

/// What the broker and the emulator did: for a test that waited in vain, to tell a stuck
/// refresh from a lost message.
async fn broker_counts(stack: &Stack) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let (b, u) = (stack.broker.stats(), stack.broker.upstream_stats());
    format!(
        "refreshes {}, refresh failures {}, signs {}, exchanges {}, certificate reads {}, retries {}, breaker rejections {}; emulator routes {}",
        b.refreshes.get(),
        b.refresh_failures.get(),
        u.signs.load(Relaxed),
        u.exchanges.load(Relaxed),
        u.certificate_reads.load(Relaxed),
        u.retries.load(Relaxed),
        u.breaker_rejections.load(Relaxed),
        stack.counters().await["routes"],
    )
}

/// Moves the clock a minute at a time until the stream says what `done` looks for
/// (bounded: at most an hour of simulated time, a few seconds of real time per step).
async fn advance_until(
    stack: &Stack,
    stream: &mut tonic::Streaming<tokenbroker::proto::WatchTokenResponse>,
    done: impl Fn(&tokenbroker::proto::WatchTokenResponse) -> bool,
) -> tokenbroker::proto::WatchTokenResponse {
    let mut seen = Vec::new();
    for _ in 0..60 {
        stack.advance(MIN).await;
        while let Ok(m) = tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
            let m = m.unwrap().expect("the stream stays open");
            if done(&m) {
                return m;
            }
            seen.push((m.token.is_some(), m.refresh_failing, m.last_error));
        }
    }
    panic!(
        "the stream never reached the expected state; messages seen (token, failing, error): {seen:?}; {}",
        broker_counts(stack).await
    );
}

fn now_unix(stack: &Stack) -> i64 {
    use tokenbroker::clock::Clock;
    stack.clock.as_ref().unwrap().unix() as i64
}

async fn health_status(stack: &Stack) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_prewarmed_keys_through_an_outage() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use tonic_health::ServingStatus;
    // Entra is out at start: pre-warming fails until it is back.
    let (down, tried) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU32::new(0)));
    let stack = Stack::start_full(
        estate(),
        tuned("prewarm = [{ tenant = \"contoso\", scopes = [\"https://graph.microsoft.com/.default\"] }]"),
        Some(ManualClock::new()),
        |inner| {
            Arc::new(Outage {
                inner,
                down: down.clone(),
                tried: tried.clone(),
            })
        },
    )
    .await;
    wait_for(|| async { tried.load(Ordering::SeqCst) >= 1 }).await;
    assert_eq!(
        health_status(&stack).await,
        ServingStatus::NotServing as i32
    );
    down.store(false, Ordering::SeqCst);
    // The pre-warm retries on the broker's clock.
    for _ in 0..60 {
        if health_status(&stack).await == ServingStatus::Serving as i32 {
            break;
        }
        stack.advance(Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health_status(&stack).await, ServingStatus::Serving as i32);
    // The key was cached before the broker said it was ready.
    let r = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(r.source, TokenSource::Cache as i32);
    stack.stop().await;
}

/// Entra out of service (503, retryable) while `down` is set; counts the exchanges tried.
#[derive(Debug)]
struct Outage {
    inner: Arc<dyn TokenExchange>,
    down: Arc<std::sync::atomic::AtomicBool>,
    tried: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait::async_trait]
impl TokenExchange for Outage {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        use std::sync::atomic::Ordering;
        self.tried.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(EntraError {
                class: EntraErrorClass::Retryable,
                status: 503,
                error: "temporarily_unavailable".into(),
                codes: vec![90033],
                description: "AADSTS90033: A transient error has occurred.".into(),
                correlation_id: Some(req.correlation_id.to_string()),
                trace_id: None,
                retry_after: None,
            });
        }
        self.inner.exchange(req).await
    }
}

/// A pre-warm key that fails for a reason retrying will not fix (here a customer tenant
/// disabled the app) is given up: readiness waits for the other keys only, or one tenant's
/// state would keep every new replica out of service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_does_not_wait_for_a_prewarmed_key_that_fails_for_good() {
    use tonic_health::ServingStatus;
    let mut emu = estate();
    emu.tenants[0].apps[0].enabled = false;
    let stack = Stack::start_full(
        emu,
        tuned(
            "prewarm = [{ tenant = \"contoso\", scopes = [\"https://graph.microsoft.com/.default\"] }, \
             { tenant = \"fabrikam\", scopes = [\"https://graph.microsoft.com/.default\"] }]",
        ),
        Some(ManualClock::new()),
        |e| e,
    )
    .await;
    // No time is moved: the broker is ready without a retry of contoso.
    wait_for(|| async { health_status(&stack).await == ServingStatus::Serving as i32 }).await;
    let r = stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(
        r.source,
        TokenSource::Cache as i32,
        "fabrikam was pre-warmed"
    );
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        stack.route_total("entra.token").await,
        2,
        "contoso once (then remembered), fabrikam once"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_min_validity_beyond_the_tokens_lifetime_costs_no_upstream_call() {
    // Entra's tokens live 3599 s here; the broker accepts a min_validity of up to 3600 s.
    let emu = estate_living(3599);
    let stack = Stack::start_full(emu, tuned(""), Some(ManualClock::new()), |e| e).await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let mut c = stack.client().await;
    for _ in 0..10 {
        let e = c
            .get_token(GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                min_validity: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                force_refresh: false,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(
            e.message().contains("issued valid for 3599s")
                && e.message().contains("ask for at most 3599s"),
            "the most a token has: {}",
            e.message()
        );
    }
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        1,
        "no exchange for a validity no token has"
    );
    assert_eq!(stack.total_signs().await, 1);
    let again = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(again.source, TokenSource::Cache as i32);
    assert_eq!(again.access_token, first.access_token);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_minimum_beyond_the_tokens_lifetime_still_serves_callers_asking_none() {
    // The configuration accepts a default of up to 3600 s; Entra's tokens live 3599 s here.
    let emu = estate_living(3599);
    let stack = Stack::start_full(
        emu,
        |t| format!("{t}\n[cache]\ndefault_min_validity_secs = 3600\n"),
        Some(ManualClock::new()),
        |e| e,
    )
    .await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(first.source, TokenSource::Exchange as i32);
    // Owed half the token's life: served from the cache for the first half hour.
    stack.advance(Duration::from_secs(20 * 60)).await;
    let again = stack.get("contoso", GRAPH).await.unwrap();
    assert_eq!(again.source, TokenSource::Cache as i32);
    assert_eq!(again.access_token, first.access_token);
    assert_eq!(
        stack
            .exchanges(demo::CONTOSO_TENANT, demo::CONTOSO_APP)
            .await,
        1,
        "not refreshed every half minute"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_entra_holds_a_cold_caller_no_longer_than_the_retry_budget() {
    // The outbound request timeout (30 s) is longer than the fetch's budget (1 s here, as an
    // attempt's bound is timed by the runtime, not the manual clock), and the held request
    // would outlast both.
    let stack = manual("retry_budget_secs = 1").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "hang": true, "count": 1, "duration_ms": 120000}),
        )
        .await;
    let cold = spawn_get(&stack, "contoso").await;
    wait_for(|| async { faults_left(&stack).await == 0 }).await;
    let e = tokio::time::timeout(Duration::from_secs(60), cold)
        .await
        .expect("answered once the budget is spent")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("Entra ID"), "{}", e.message());
    assert!(e.message().contains("retry budget"), "{}", e.message());
    // The request got no answer: its client-request-id is kept for Microsoft's support.
    assert!(
        e.message().contains("did not answer") && e.message().contains("[client-request-id "),
        "{}",
        e.message()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_calls_finish_and_refuses_new_ones() {
    let stack = Stack::start_with(estate(), |t| t).await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "latency_ms": 3000, "count": 1}),
        )
        .await;
    let in_flight = spawn_get(&stack, "contoso").await;
    // The fault is spent as the exchange reaches Entra, before its latency.
    wait_for(|| async { faults_left(&stack).await == 0 }).await;
    let addr = stack.addr;
    let stopped = tokio::spawn(stack.stop());
    // While the call is still held upstream, new connections are refused.
    wait_for(|| async {
        tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .is_err()
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "new connections were refused while the call was in flight"
    );
    let r = in_flight.await.unwrap();
    assert!(r.is_ok(), "the in-flight call completed: {r:?}");
    stopped.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_and_ends_watches() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let stack = Stack::start_with(estate(), |t| t).await;
    let mut w = watch(&stack, "contoso").await;
    assert!(w.message().await.unwrap().unwrap().token.is_some());
    // A health watch opened before the shutdown sees it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "tokenbroker.v1.TokenBroker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let stopped = tokio::spawn(stack.stop());
    let next = tokio::time::timeout(Duration::from_secs(30), health.message())
        .await
        .expect("the health watch hears of the shutdown");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32,
        "NOT_SERVING before the server goes"
    );
    let end = tokio::time::timeout(Duration::from_secs(30), w.message())
        .await
        .expect("the watch ends at shutdown, it does not hold the drain");
    // Not a clean end, which a client may take for "finished": told to reconnect.
    let end = end.expect_err("the watch ends with a status");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    assert!(end.metadata().get("retry-after").is_some(), "{end:?}");
    // Neither stream holds the drain for its grace period (20 s).
    assert!(
        matches!(health.message().await, Ok(None)),
        "the health watch ends"
    );
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("shutdown completes without waiting out its grace period")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_even_when_a_call_hangs() {
    // Neither the outbound timeout nor the retry budget ends the call before the test does:
    // only the shutdown's grace period can.
    let stack = Stack::start_with(estate(), |t| {
        format!(
            "{}\n[resilience]\nretry_budget_secs = 600\n",
            t.replace("[server]\n", "[server]\nshutdown_grace_secs = 1\n")
                .replace("[outbound]\n", "[outbound]\nrequest_timeout_secs = 600\n")
        )
    })
    .await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "hang": true, "count": 1, "duration_ms": 120000}),
        )
        .await;
    let hung = spawn_get(&stack, "contoso").await;
    // The fault is spent once the request is being held.
    wait_for(|| async { faults_left(&stack).await == 0 }).await;
    // Returns once the grace period is over, although the upstream call never answers.
    tokio::time::timeout(Duration::from_secs(60), stack.stop())
        .await
        .expect("shutdown ends after its grace period, not with the upstream call");
    let r = hung.await.unwrap();
    assert!(
        r.is_err(),
        "the hung call is cut off, not left hanging: {r:?}"
    );
}

/// A contoso Graph token from the broker at `addr` (plaintext, no credentials).
fn contoso_token_from(addr: &str) -> tokenbroker::proto::GetTokenResponse {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = rt.block_on(async {
        let mut c = tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .unwrap();
        c.get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(token.tenant_id, demo::CONTOSO_TENANT);
    token
}

#[test]
fn tokenbroker_dev_keeps_serving_when_its_stdout_is_closed() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: the banner with the bound address is what the
    // test cannot read.
    let addr = free_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["dev", "--listen", &addr, "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Like `tokenbroker dev | true`: the pipe is closed before the banner is written.
    drop(child.stdout.take());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(async {
        for _ in 0..600 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dev exited with its stdout closed: {status:?}");
            }
            if tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(format!(
                "http://{addr}"
            ))
            .await
            .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(up, "dev serves on {addr}");
    contoso_token_from(&addr);
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
}

#[test]
fn tokenbroker_dev_keeps_serving_when_nobody_reads_its_log() {
    // The log goes to a pipe nobody reads, as with a stalled log shipper: once the pipe's
    // buffer is full, every write to it blocks. At trace level a request writes ~200 lines.
    let dir = tempfile::tempdir().unwrap();
    let mut dev = spawn_dev_with(
        dir.path(),
        &[("TOKENBROKER_LOG", "trace")],
        std::process::Stdio::piped(),
    );
    let stalled = dev.child.stderr.take();
    let rt = tokio::runtime::Runtime::new().unwrap();
    const REQUESTS: usize = 150;
    let dropped = rt.block_on(async {
        for i in 0..REQUESTS {
            let answer = tokio::time::timeout(Duration::from_secs(60), async {
                // A connection each: more log lines per request.
                let mut c = tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(
                    format!("http://{}", dev.addr),
                )
                .await?;
                let r = c
                    .get_token(GetTokenRequest {
                        tenant: "contoso".into(),
                        scopes: vec![GRAPH.into()],
                        ..Default::default()
                    })
                    .await?;
                Ok::<_, Box<dyn std::error::Error>>(r.into_inner())
            })
            .await
            .unwrap_or_else(|_| panic!("request {i} got no answer while the log is stalled"))
            .unwrap();
            assert_eq!(answer.tenant_id, demo::CONTOSO_TENANT);
        }
        let text = reqwest::get(&dev.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("tokenbroker_log_lines_dropped_total "))
            .unwrap_or_else(|| panic!("no dropped-lines counter in\n{text}"))
            .parse::<f64>()
            .unwrap()
    });
    assert!(
        dropped > 0.0,
        "the queue of log lines overflowed and was counted"
    );
    let code = terminate(&mut dev.child);
    assert!(code.success(), "exit status {code:?}");
    drop(stalled);
    // Stdout carries what it says (the audit trail, with `output = "stdout"`): the log
    // writer giving up on its queue at exit must not write there.
    let later = dev.later_stdout.join().unwrap();
    assert!(
        later.iter().all(|l| !l.contains("logging worker")),
        "{later:?}"
    );
}

/// Lines of a file once it has `n` of them (the audit writer writes within ~100 ms).
fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    for _ in 0..300 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text.lines().map(str::to_owned).collect();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} never had {n} lines", path.display());
}

/// A SIGHUP to a broker with no files to reload (the dev configuration: policy inline,
/// plaintext) is logged and does what is left to do: without a handler, its default action
/// ended the process.
#[test]
fn sighup_does_not_end_a_broker_with_no_files_to_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    contoso_token_from(&addr);
    hangup(&child);
    let log = dir.path().join("stderr.log");
    let logged = wait_for_log(&log, "SIGHUP: no files to reload");
    assert!(
        logged.contains("SIGHUP: remembered configuration failures forgotten: 0"),
        "{logged}"
    );
    assert!(!logged.contains("nothing to reload"), "{logged}");
    assert_eq!(child.try_wait().unwrap(), None, "SIGHUP ended the broker");
    contoso_token_from(&addr);
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
}

fn hangup(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The log at `path` once it holds `line` (waited for, bounded).
fn wait_for_log(path: &std::path::Path, line: &str) -> String {
    for _ in 0..100 {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(line) {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no `{line}` in {}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// An operator who has fixed a tenant's app registration need not wait out
/// `negative_ttl_secs`, nor restart the broker: `tokenbroker serve`, as deployed, asks again
/// at once after a SIGHUP; until then, callers are told the failure is remembered, and for
/// how long.
#[test]
fn sighup_forgets_a_remembered_configuration_failure() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let Served {
        mut child,
        emulator,
        addr,
    } = serve(
        &rt,
        dir.path(),
        "\n[resilience]\nnegative_ttl_secs = 600\n",
        &[],
        std::fs::File::create(&log).unwrap().into(),
    );
    let faults = format!("{}/faults", emulator.endpoints().admin_url);
    let http = reqwest::Client::new();
    let ask = || GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    };
    rt.block_on(async {
        // Entra does not know contoso's app in its tenant (no administrator consented yet).
        let added = http
            .post(&faults)
            .json(
                &json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 1000,
                "fail": app_not_found()}),
            )
            .send()
            .await
            .unwrap();
        assert!(added.status().is_success(), "{added:?}");
        let mut c = client_when_listening(addr).await;
        let e = c.get_token(ask()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("AADSTS700016"), "{}", e.message());
        // For 10 minutes less the time taken since (the unit tests tell the exact time left).
        let told = e.message();
        assert!(
            told.contains("(remembered: this tenant and these scopes are not asked for again for ")
                && told.ends_with("; SIGHUP the broker to ask at once)"),
            "{told}"
        );
        // Consent granted: Entra would issue the token now, but the refusal is remembered.
        let cleared = http.delete(&faults).send().await.unwrap();
        assert!(cleared.status().is_success(), "{cleared:?}");
        let e = c.get_token(ask()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("AADSTS700016"), "{}", e.message());
        assert!(e.message().contains("(remembered: "), "{}", e.message());
        hangup(&child);
        wait_for_log(
            &log,
            "SIGHUP: remembered configuration failures forgotten: 1",
        );
        let token = c.get_token(ask()).await.expect("asked again").into_inner();
        assert_eq!(token.tenant_id, demo::CONTOSO_TENANT);
    });
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    rt.block_on(emulator.shutdown());
}

#[test]
fn the_audit_file_of_a_running_broker_can_be_rotated_by_renaming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    let audit = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let first = contoso_token_from(&addr);
    wait_for_lines(&audit, 1);
    // What logrotate does by default: rename, and expect the writer to start a new file.
    std::fs::rename(&audit, &rotated).unwrap();
    let second = contoso_token_from(&addr);
    let new = wait_for_lines(&audit, 1);
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    assert_eq!(std::fs::read_to_string(&audit).unwrap().lines().count(), 1);
    let record: serde_json::Value = serde_json::from_str(&new[0]).unwrap();
    assert_eq!(record["outcome"], "allowed");
    for token in [&first.access_token, &second.access_token] {
        assert!(!old.contains(token.as_str()) && !new[0].contains(token.as_str()));
    }
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(log.contains("audit file renamed or removed"), "{log}");
}

#[test]
fn tokenbroker_token_reports_a_closed_stdout_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    let mut token = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args([
            "token",
            "--addr",
            &format!("http://{addr}"),
            "--tenant",
            "contoso",
        ])
        .args(["--scope", GRAPH])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the token (`tokenbroker token | true`).
    drop(token.stdout.take());
    let out = token.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("eyJ"), "no token in the message: {stderr}");
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
}

/// `tokenbroker token` for contoso's Graph token from `url`: it must fail with `exit`; its
/// stderr.
fn token_cli_error(url: &str, exit: i32) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["token", "--addr", url])
        .args(["--tenant", "contoso", "--scope", GRAPH])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(exit), "{stderr}");
    stderr
}

#[test]
fn tokenbroker_token_says_why_it_cannot_connect() {
    // A port nobody listens on.
    let addr = free_port();
    // Worth retrying: EX_UNAVAILABLE.
    let stderr = token_cli_error(&format!("http://{addr}"), 69);
    assert!(
        stderr.contains(&format!("cannot connect to http://{addr}")),
        "{stderr}"
    );
    // The cause, not only tonic's "transport error".
    assert!(stderr.contains("Connection refused"), "{stderr}");

    // https:// to a plaintext broker: the cause, and what to try.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    // A mistake on this side, which retrying does not fix: 1.
    let stderr = token_cli_error(&format!("https://{addr}"), 1);
    assert!(stderr.contains("InvalidContentType"), "{stderr}");
    assert!(stderr.contains("try an http:// --addr"), "{stderr}");
    assert!(terminate(&mut child).success());
}

#[test]
fn a_client_retrying_a_bad_request_does_not_flood_the_log_but_every_refusal_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    const TRIES: usize = 200;
    rt.block_on(async {
        let mut c = tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .unwrap();
        for _ in 0..TRIES {
            let s = c
                .get_token(GetTokenRequest {
                    tenant: "no-such-tenant".into(),
                    scopes: vec![GRAPH.into()],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(s.code(), Code::NotFound, "{s:?}");
        }
    });
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), TRIES, "every refusal is audited");
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    // At most 20 lines a second (by the second in each line's time, which can fall just
    // after the second it was counted in: one more at a boundary).
    let mut per_second: HashMap<&str, usize> = HashMap::new();
    for l in log
        .lines()
        .filter(|l| l.contains("request refused or failed"))
    {
        *per_second.entry(&l[..19]).or_default() += 1;
    }
    assert!(!per_second.is_empty(), "{log}");
    assert!(
        per_second.values().all(|&n| n <= 21),
        "refusal lines per second: {per_second:?}"
    );
}

#[test]
fn tokenbroker_dev_on_a_port_in_use_says_why_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["dev", "--listen", &addr, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("tokenbroker dev: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");
}

#[test]
fn sigterm_stops_tokenbroker_dev_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    let token = contoso_token_from(&addr);
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    // The audit writer drained before the exit: the grant is on disk, the token not.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{audit}");
    assert_eq!(records[0]["outcome"], "allowed");
    assert!(!audit.contains(&token.access_token));
    // The log, written to a file: plain text without colour codes, and no token.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("token obtained"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file: {log}");
    assert!(!log.contains(&token.access_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_not_yet_on_the_app_falls_back_to_the_previous_version() {
    let stack = manual("").await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let old = x5t_of(&stack.assertions.lock().unwrap()[0]);
    // Key Vault renews the certificate, but nobody has uploaded the new one to the app yet.
    let new = rotate_contoso(&stack, false).await;
    let mut watch = watch(&stack, "contoso").await;
    watch_next(&mut watch).await;
    ask_every_minute(&stack, 16).await;
    let refreshed = advance_until(&stack, &mut watch, |m| {
        !m.refresh_failing && m.token.as_ref().unwrap().access_token != first.access_token
    })
    .await;
    assert!(refreshed.token.is_some());
    let seen = stack.assertions.lock().unwrap().clone();
    let n = seen.len();
    assert_eq!(
        x5t_of(&seen[n - 2]),
        new,
        "the renewed version was tried first"
    );
    assert_eq!(
        x5t_of(&seen[n - 1]),
        old,
        "then the previous version, which Entra accepts"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_not_on_the_app_is_named_when_the_previous_version_is_disabled() {
    let stack = manual("").await;
    stack.get("contoso", GRAPH).await.unwrap();
    let id = stack.certificate_bundle("contoso-app").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old = id.rsplit('/').next().unwrap();
    // Key Vault renews the certificate, nobody uploads the new one to the app, and the old
    // version is disabled: no version the broker can sign with is one Entra accepts.
    rotate_contoso(&stack, false).await;
    stack
        .admin_post(
            &format!(
                "/vaults/{}/certificates/contoso-app/versions/{old}/disable",
                demo::VAULT
            ),
            json!({}),
        )
        .await;
    // Past the certificate metadata refresh: the renewed version is read, then refused.
    stack.advance(11 * MIN).await;
    let e = stack.force_refresh("contoso", GRAPH).await.unwrap_err();
    // The fix is on the app registration (Entra's refusal of the current version), not the
    // disabled version the broker tried as a fallback.
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("AADSTS700027"), "{}", e.message());
    assert!(
        e.message().contains("upload the certificate"),
        "{}",
        e.message()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_refresh_in_sets_the_refresh_time_of_long_lived_tokens() {
    // Two-hour tokens: Entra sends refresh_in (half the lifetime), which the broker follows
    // instead of its own refresh_fraction (a quarter here).
    let emu = estate_living(7200);
    let stack = Stack::start_full(emu, tuned(""), Some(ManualClock::new()), |e| e).await;
    let token = stack.get("contoso", GRAPH).await.unwrap();
    let until_refresh = secs(&token.refresh_at) - now_unix(&stack);
    assert!(
        (3590..=3600).contains(&until_refresh),
        "refresh in {until_refresh} s, not at a quarter of 7200 s"
    );
    stack.stop().await;
}

/// A GetToken for `tenant` and a scope of its own for `i`: a key no other call shares, so
/// nothing per key (single flight, remembered failures) stands between it and the upstreams.
async fn get_key(stack: &Stack, tenant: &str, i: usize) -> Result<(), tonic::Status> {
    stack
        .get(tenant, &format!("api://resource-{i}/.default"))
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_entras_breaker_is_open_no_assertion_is_signed_for_it() {
    let stack = manual("breaker_failures = 2\nmax_attempts = 1").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 100000, "fail": {"status": 503}}),
        )
        .await;
    let exchanges_before = stack.route_total("entra.token").await;
    for i in 0..2 {
        let e = get_key(&stack, "contoso", i).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    let signs = stack.route_total("keyvault.sign").await;
    let exchanges = stack.route_total("entra.token").await;
    assert_eq!(exchanges, exchanges_before + 2, "the breaker opens");
    for i in 2..12 {
        let e = get_key(&stack, "contoso", i).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("circuit open"), "{}", e.message());
    }
    assert_eq!(
        stack.route_total("keyvault.sign").await,
        signs,
        "no sign for an exchange the open breaker refuses"
    );
    assert_eq!(stack.route_total("entra.token").await, exchanges);
    // Another tenant on the same vault signs and is served as ever.
    stack.get("fabrikam", GRAPH).await.unwrap();
    assert_eq!(stack.route_total("keyvault.sign").await, signs + 1);

    // Past the cool-down the probe signs and goes through; the breaker closes.
    stack.clear_faults().await;
    stack.advance(Duration::from_secs(31)).await;
    stack.get("contoso", GRAPH).await.unwrap();
    stack.stop().await;
}

fn retry_after_secs(e: &tonic::Status) -> u64 {
    e.metadata()
        .get("retry-after")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entras_retry_after_holds_off_the_tenants_exchanges_until_then() {
    let stack = manual("").await;
    // Beyond the fetch's budget (10 s): the first caller is told at once.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 100, "fail": {"status": 429, "retry_after": 60}}),
        )
        .await;
    let e = get_key(&stack, "contoso", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(retry_after_secs(&e), 60);
    let exchanges = stack.route_total("entra.token").await;
    for i in 1..6u64 {
        stack.advance(Duration::from_secs(10)).await;
        let e = get_key(&stack, "contoso", i as usize).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert_eq!(retry_after_secs(&e), 60 - 10 * i, "{}", e.message());
    }
    assert_eq!(
        stack.route_total("entra.token").await,
        exchanges,
        "Entra is not asked again before its Retry-After"
    );
    // Entra throttles per tenant and app: other tenants are asked as ever.
    stack.get("fabrikam", GRAPH).await.unwrap();
    stack.clear_faults().await;
    stack.advance(Duration::from_secs(10)).await;
    stack.get("contoso", GRAPH).await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vaults_retry_after_holds_off_the_vaults_signs_until_then() {
    let stack = manual("").await;
    // Key Vault throttles per vault: every tenant whose key is in it waits the hinted time.
    stack
        .admin_post(
            "/faults",
            json!({"route": "keyvault.sign", "count": 100, "fail": {"status": 429, "retry_after": 60}}),
        )
        .await;
    let e = get_key(&stack, "contoso", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(retry_after_secs(&e), 60);
    let signs = stack.route_total("keyvault.sign").await;
    for i in 1..6u64 {
        stack.advance(Duration::from_secs(10)).await;
        for tenant in ["contoso", "fabrikam"] {
            let e = get_key(&stack, tenant, i as usize).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert_eq!(retry_after_secs(&e), 60 - 10 * i, "{}", e.message());
            assert!(e.message().contains("throttled"), "{}", e.message());
        }
    }
    assert_eq!(
        stack.route_total("keyvault.sign").await,
        signs,
        "Key Vault is not asked to sign again before its Retry-After"
    );
    stack.clear_faults().await;
    stack.advance(Duration::from_secs(10)).await;
    stack.get("fabrikam", GRAPH).await.unwrap();
    stack.stop().await;
}

/// The correlation id an Entra error's message quotes.
fn correlation_id(message: &str) -> &str {
    let from = message.find("[correlation id ").expect("a correlation id") + 16;
    let len = message[from..].find([',', ']']).unwrap();
    &message[from..from + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_names_the_failure_that_opened_it_and_the_next_try() {
    let stack = manual("breaker_failures = 2\nmax_attempts = 1").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "tenant": demo::CONTOSO_TENANT, "count": 100, "fail": {"status": 429}}),
        )
        .await;
    get_key(&stack, "contoso", 0).await.unwrap_err();
    let opened = get_key(&stack, "contoso", 1).await.unwrap_err();
    let e = get_key(&stack, "contoso", 2).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let m = e.message();
    for part in [
        "throttled",
        "next try in 30s",
        "AADSTS90055",
        correlation_id(opened.message()),
    ] {
        assert!(m.contains(part), "{part:?} in {m}");
    }
    assert!(!m.contains("unreachable"), "{m}");
    assert_eq!(retry_after_secs(&e), 30);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breakers_probe_lost_to_a_silent_connection_is_asked_again_as_the_probe() {
    let stack = manual("").await;
    // Throttled for 20 s (beyond the budget: told at once): Fabrikam's Entra breaker opens.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "tenant": demo::FABRIKAM_TENANT, "count": 1, "fail": {"status": 429, "retry_after": 20}}),
        )
        .await;
    stack.get("fabrikam", GRAPH).await.unwrap_err();
    // Once it is over, the probe's request is taken and never answered; its retry on a new
    // connection is still the probe, and is answered.
    stack.advance(Duration::from_secs(21)).await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "hang": true, "count": 1, "duration_ms": 120000}),
        )
        .await;
    let t = tokio::time::timeout(Duration::from_secs(60), stack.get("fabrikam", GRAPH))
        .await
        .expect("answered within the bound")
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(t.source, TokenSource::Exchange as i32);
    assert_eq!(
        faults_left(&stack).await,
        0,
        "the probe's first request hung"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_slower_than_half_the_budget_on_every_request_still_answers() {
    // A 4 s budget: the first attempt is asked again after 2 s, whose answer would
    // come past the budget; every Entra answer takes 3 s (a degraded region).
    let stack = manual("retry_budget_secs = 4").await;
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "latency_ms": 3000, "count": 100}),
        )
        .await;
    let r = tokio::time::timeout(Duration::from_secs(60), stack.get("contoso", GRAPH))
        .await
        .expect("answered within the bound")
        .expect("the first request's answer is taken");
    assert_eq!(r.source, TokenSource::Exchange as i32);
    assert_eq!(r.tenant_id, demo::CONTOSO_TENANT);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_gets_no_answer_is_asked_again_within_the_budget() {
    // Half of the default 10 s budget: a request unanswered for 5 s (of the runtime's time:
    // the manual clock stands still) is asked again. (Key Vault's first attempt is
    // bounded so only from a budget of 10 s: the managed identity token it needs first may
    // take the credential's 4 s.)
    let stack = manual("").await;
    for (tenant, route) in [("contoso", "keyvault.sign"), ("fabrikam", "entra.token")] {
        stack
            .admin_post(
                "/faults",
                json!({"route": route, "hang": true, "count": 1, "duration_ms": 120000}),
            )
            .await;
        let r = tokio::time::timeout(Duration::from_secs(60), stack.get(tenant, GRAPH))
            .await
            .expect("answered within the bound");
        r.unwrap_or_else(|e| panic!("{route}: {e:?}"));
        assert_eq!(
            faults_left(&stack).await,
            0,
            "the first {route} request hung"
        );
    }
    // Slow but answering within half the budget: answered the first time.
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "latency_ms": 1000, "count": 1}),
        )
        .await;
    let before = stack.route_total("entra.token").await;
    // (A resource the tenant does not know: Entra's own refusal is its answer.)
    let e = get_key(&stack, "contoso", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(stack.route_total("entra.token").await, before + 1);
    stack.stop().await;
}

/// A second `tokenbroker dev` on the address and state directory of one already running
/// (one left in the background, say) fails on the address, and leaves the running one's
/// state alone: its endpoints, CA and configuration stay those of its own emulator, which
/// clients such as the collector example read.
#[test]
fn a_second_dev_on_a_taken_address_leaves_the_running_ones_state_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_dev(dir.path(), &[]);
    let state = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let before: Vec<_> = ["endpoints.json", "ca.pem", "broker.toml"]
        .iter()
        .map(|f| state(f))
        .collect();
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["dev", "--listen", &addr, "--state-dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success(), "the second dev started");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&addr), "{err}");
    let after: Vec<_> = ["endpoints.json", "ca.pem", "broker.toml"]
        .iter()
        .map(|f| state(f))
        .collect();
    assert!(
        before == after,
        "the second dev rewrote the running one's state"
    );
    contoso_token_from(&addr);
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
}
