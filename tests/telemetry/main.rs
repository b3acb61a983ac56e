//! Observability, end to end against the emulator: the admin listener's `/metrics` after a
//! scripted sequence (coalesced cold calls, a hit, an Entra failure with an AADSTS code),
//! `/healthz` and `/readyz` following the gRPC health state, and the span tree of a cache
//! miss carrying the caller's W3C trace id down to Key Vault, managed identity and Entra;
//! OTLP export to a collector (`otlp.rs`).

#[path = "../broker/helpers.rs"]
#[allow(unused_imports)]
mod helpers;
mod otlp;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use helpers::*;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::entra::{EntraError, EntraToken, ExchangeRequest, TokenExchange};
use tokenbroker::proto::GetTokenRequest;
use tracing_subscriber::layer::SubscriberExt;

/// The one global subscriber of this binary: the broker's spans into an in-memory exporter.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::filter::Targets::new()
                    .with_target("tokenbroker", tracing::Level::INFO),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per binary");
        exporter
    })
}

/// Holds every exchange until the test opens the gate, so concurrent cold calls coalesce.
#[derive(Debug)]
struct Gate {
    inner: Arc<dyn TokenExchange>,
    open: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl TokenExchange for Gate {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        let _permit = self.open.acquire().await.unwrap();
        self.inner.exchange(req).await
    }
}

async fn scrape(stack: &Stack) -> String {
    let r = reqwest::get(format!("http://{}/metrics", stack.admin))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    r.text().await.unwrap()
}

/// `name{labels} value` lines of a scrape, by series.
fn series(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse::<f64>().unwrap())
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no series {key} in\n{s:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_sequence_exactly() {
    spans();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let open = gate.clone();
    let stack = Stack::start_full(
        EmulatorConfig::demo(),
        |t| t,
        None,
        move |inner| Arc::new(Gate { inner, open }),
    )
    .await;

    // Probes: alive, and ready once gRPC health is SERVING (no pre-warm configured).
    let healthz = reqwest::get(format!("http://{}/healthz", stack.admin))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    wait_for(|| async {
        reqwest::get(format!("http://{}/readyz", stack.admin))
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;

    // Five concurrent cold calls: one fetch, four coalesced waits.
    const COLD: usize = 5;
    let mut calls = Vec::new();
    for _ in 0..COLD {
        let mut c = stack.client().await;
        calls.push(tokio::spawn(async move {
            c.get_token(GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            })
            .await
        }));
    }
    // Misses are counted once answered: the joins say when the four wait with the first.
    let stats = stack.broker.stats();
    wait_for(|| async { stats.coalesced.get() == COLD as u64 - 1 }).await;
    gate.add_permits(1000);
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // A hit.
    stack.get("contoso", GRAPH).await.unwrap();
    // An upstream failure: Entra refuses fabrikam's app with an AADSTS code (not retried).
    stack
        .admin_post(
            "/faults",
            json!({"route": "entra.token", "count": 1, "fail": app_not_found()}),
        )
        .await;
    let failed = stack.get("fabrikam", GRAPH).await.unwrap_err();
    let failed_code = tokenbroker::api::error::code_name(failed.code());

    let text = scrape(&stack).await;
    let s = series(&text);
    let v = |k: &str| value(&s, k);
    // Cache.
    assert_eq!(
        v("tokenbroker_cache_misses_total"),
        (COLD + 1) as f64,
        "{text}"
    );
    assert_eq!(v("tokenbroker_cache_coalesced_total"), (COLD - 1) as f64);
    assert_eq!(v("tokenbroker_cache_hits_total"), 1.0);
    assert_eq!(v("tokenbroker_cache_stale_served_total"), 0.0);
    assert_eq!(v("tokenbroker_cache_negative_hits_total"), 0.0);
    assert_eq!(v("tokenbroker_refreshes_total"), 0.0);
    // The failed fetch was a caller's, not a refresh.
    assert_eq!(v("tokenbroker_refresh_failures_total"), 0.0);
    assert_eq!(v("tokenbroker_caller_fetch_failures_total"), 1.0);
    assert_eq!(v("tokenbroker_upstream_retries_total"), 0.0);
    assert_eq!(v("tokenbroker_breaker_rejections_total"), 0.0);
    // Requests.
    assert_eq!(
        v(r#"tokenbroker_requests_total{code="OK",method="GetToken",outcome="ok"}"#),
        (COLD + 1) as f64
    );
    assert_eq!(
        v(&format!(
            r#"tokenbroker_requests_total{{code="{failed_code}",method="GetToken",outcome="error"}}"#
        )),
        1.0
    );
    assert_eq!(
        v(r#"tokenbroker_request_duration_seconds_count{method="GetToken",outcome="ok"}"#),
        (COLD + 1) as f64
    );
    assert_eq!(
        v(
            r#"tokenbroker_request_duration_seconds_bucket{method="GetToken",outcome="ok",le="+Inf"}"#
        ),
        (COLD + 1) as f64
    );
    assert_eq!(
        v(r#"tokenbroker_request_duration_seconds_count{method="GetToken",outcome="error"}"#),
        1.0
    );
    // Upstreams: one fetch per tenant, each one certificate read and one sign; Entra once
    // fine and once refused with its AADSTS code.
    assert_eq!(
        v(
            r#"tokenbroker_upstream_calls_total{code="",result="ok",upstream="keyvault_certificate"}"#
        ),
        2.0
    );
    assert_eq!(
        v(r#"tokenbroker_upstream_calls_total{code="",result="ok",upstream="keyvault_sign"}"#),
        2.0
    );
    assert_eq!(
        v(r#"tokenbroker_upstream_calls_total{code="",result="ok",upstream="entra"}"#),
        1.0
    );
    assert_eq!(
        v(
            r#"tokenbroker_upstream_calls_total{code="AADSTS700016",result="error",upstream="entra"}"#
        ),
        1.0
    );
    for (upstream, ok, err) in [
        ("keyvault_certificate", 2.0, None),
        ("keyvault_sign", 2.0, None),
        ("entra", 1.0, Some(1.0)),
    ] {
        assert_eq!(
            v(&format!(
                r#"tokenbroker_upstream_duration_seconds_count{{result="ok",upstream="{upstream}"}}"#
            )),
            ok
        );
        let key = format!(
            r#"tokenbroker_upstream_duration_seconds_count{{result="error",upstream="{upstream}"}}"#
        );
        assert_eq!(s.get(&key).copied(), err, "{key}");
    }
    // The managed identity token is fetched inside the Key Vault SDK call: as often as the
    // emulator saw it asked for.
    let mi = stack.route_total("identity.imds").await as f64;
    assert!(mi >= 1.0);
    assert_eq!(
        v(r#"tokenbroker_upstream_calls_total{code="",result="ok",upstream="managed_identity"}"#),
        mi
    );
    assert_eq!(
        v(
            r#"tokenbroker_upstream_duration_seconds_count{result="ok",upstream="managed_identity"}"#
        ),
        mi
    );
    let broker_stats = stack.broker.upstream_stats();
    assert_eq!(
        broker_stats
            .certificate_reads
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // State: the soonest expiry per tenant with a token, breakers closed.
    let expiry = v(r#"tokenbroker_token_expiry_seconds{tenant="contoso"}"#);
    assert!(expiry > 0.0 && expiry <= 2.0 * 3600.0, "{expiry}");
    assert!(!s.contains_key(r#"tokenbroker_token_expiry_seconds{tenant="fabrikam"}"#));
    assert_eq!(
        v(r#"tokenbroker_breaker_state{target="contoso",upstream="entra"}"#),
        0.0
    );
    // The federated identity of `contoso-federated` has its own breaker.
    assert_eq!(
        v(&format!(
            r#"tokenbroker_breaker_state{{target="{}",upstream="managed_identity"}}"#,
            demo::FIC_MI_CLIENT_ID
        )),
        0.0
    );
    // Both Key Vault breakers of the vault: signs and certificate reads.
    for upstream in ["keyvault_sign", "keyvault_certificate"] {
        let states: Vec<f64> = s
            .iter()
            .filter(|(k, _)| {
                k.starts_with("tokenbroker_breaker_state{")
                    && k.contains(&format!("upstream=\"{upstream}\""))
            })
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(states, vec![0.0], "{upstream}");
    }
    assert!(text.contains("# TYPE tokenbroker_upstream_duration_seconds histogram\n"));
    // No token material in any label or value.
    let token = stack.get("contoso", GRAPH).await.unwrap().access_token;
    assert!(!scrape(&stack).await.contains(&token));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_grpc_health_state() {
    let admin = tokenbroker::admin::bind(&tokenbroker::config::AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();
    let addr = admin.local_addr().unwrap();
    let config = tokenbroker::config::Config::from_toml_str(
        "[server]\nplaintext = true\n\n[tenants.t]\ntenant_id = \"11111111-1111-1111-1111-111111111111\"\nclient_id = \"22222222-2222-2222-2222-222222222222\"\ncredential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"c\" }\n",
        std::path::Path::new("."),
        &|_| None,
    )
    .unwrap();
    let metrics = tokenbroker::metrics::Metrics::new(&config);
    let health = tonic_health::server::HealthReporter::new();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let task = admin.spawn(tokenbroker::admin::router(metrics, health.clone()));
    let get = |path: &'static str| async move {
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .unwrap()
            .status()
    };
    // Pre-warm under way: alive, not ready.
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/readyz").await, 503);
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    assert_eq!(get("/readyz").await, 200);
    // Shutting down.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/nope").await, 404);
    task.abort();
}

fn by_name(spans: &[SpanData], name: &str) -> Vec<SpanData> {
    spans.iter().filter(|s| s.name == name).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_miss_is_one_trace_from_the_callers_traceparent_to_entra() {
    let exporter = spans();
    let stack = Stack::start_full(EmulatorConfig::demo(), |t| t, None, |e| e).await;
    let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let remote_parent = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    // A contoso Graph request in the caller's trace.
    let traced = || traced_request(&format!("00-{trace_id}-{remote_parent}-01"));
    stack.client().await.get_token(traced()).await.unwrap();

    let wanted = [
        "GetToken",
        "fetch",
        "keyvault.certificate",
        "managed_identity",
        "keyvault.sign",
        "entra.exchange",
    ];
    let trace = || -> Vec<SpanData> {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .collect()
    };
    // Spans are exported as they end; the fetch task may end just after the response.
    wait_for(|| async {
        let t = trace();
        wanted.iter().all(|w| t.iter().any(|s| s.name == *w))
    })
    .await;
    let t = trace();
    let one = |name: &str| {
        let v = by_name(&t, name);
        assert_eq!(v.len(), 1, "{name}: {v:#?}");
        v.into_iter().next().unwrap()
    };
    let request = one("GetToken");
    assert_eq!(
        request.parent_span_id, remote_parent,
        "child of the caller's span"
    );
    let fetch = one("fetch");
    assert_eq!(fetch.parent_span_id, request.span_context.span_id());
    let cert = one("keyvault.certificate");
    let sign = one("keyvault.sign");
    let exchange = one("entra.exchange");
    for s in [&cert, &sign, &exchange] {
        assert_eq!(s.parent_span_id, fetch.span_context.span_id(), "{}", s.name);
        assert_eq!(
            s.span_kind,
            opentelemetry::trace::SpanKind::Client,
            "{}",
            s.name
        );
    }
    // The broker's own managed identity token is fetched inside the first Key Vault call.
    let mi = one("managed_identity");
    assert_eq!(mi.parent_span_id, cert.span_context.span_id());
    // What Key Vault and Entra received carries the trace, each call's span as parent.
    let counters = stack.counters().await;
    for (route, span) in [
        ("keyvault.certificate", &cert),
        ("keyvault.sign", &sign),
        ("entra.token", &exchange),
    ] {
        assert_eq!(
            counters["routes"][route]["traceparent"],
            format!("00-{trace_id}-{}-01", span.span_context.span_id()),
            "{route}: {counters}"
        );
    }
    // A hit is a request span alone, in the same trace when the caller sends one.
    stack.client().await.get_token(traced()).await.unwrap();
    wait_for(|| async { by_name(&trace(), "GetToken").len() == 2 }).await;
    assert_eq!(by_name(&trace(), "keyvault.sign").len(), 1);
    stack.stop().await;
}

/// A call tonic refuses before the handler reads it (over `max_request_bytes`) is a request
/// refused, as the audit trail has it: it is in `tokenbroker_requests_total` with its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_they_are_read_are_counted() {
    let stack = Stack::start_with(EmulatorConfig::demo(), |t| {
        t.replace("[limits]\n", "[limits]\nmax_request_bytes = 4096\n")
    })
    .await;
    let mut c = stack.client().await;
    let refused = c
        .get_token(GetTokenRequest {
            tenant: "x".repeat(8 * 1024),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let code = tokenbroker::api::error::code_name(refused.code());
    let mut w = c.clone();
    let watch = w
        .watch_token(tokenbroker::proto::WatchTokenRequest {
            tenant: "x".repeat(8 * 1024),
            scopes: vec![GRAPH.into()],
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), refused.code());
    let s = series(&scrape(&stack).await);
    for method in ["GetToken", "WatchToken"] {
        let key = format!(
            r#"tokenbroker_requests_total{{code="{code}",method="{method}",outcome="error"}}"#
        );
        assert_eq!(s.get(&key).copied(), Some(1.0), "{key} in {s:#?}");
        let key = format!(
            r#"tokenbroker_request_duration_seconds_count{{method="{method}",outcome="error"}}"#
        );
        assert_eq!(s.get(&key).copied(), Some(1.0), "{key}");
    }
    stack.stop().await;
}

/// A request whose caller's deadline passes while the broker waits on an upstream is counted
/// `DEADLINE_EXCEEDED`, as its caller sees it (what `TokenbrokerRequestsFailing` alerts on),
/// not `CANCELLED` as one its caller gave up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_callers_deadline_is_counted_deadline_exceeded() {
    // Entra's answer is held until the test ends: the caller's deadline passes first.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let open = gate.clone();
    let stack = Stack::start_full(
        EmulatorConfig::demo(),
        |t| t,
        None,
        move |inner| Arc::new(Gate { inner, open }),
    )
    .await;
    let mut req = tonic::Request::new(GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    });
    req.set_timeout(std::time::Duration::from_millis(300));
    let s = stack.client().await.get_token(req).await.unwrap_err();
    assert!(
        matches!(
            s.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{s:?}"
    );
    let key =
        r#"tokenbroker_requests_total{code="DEADLINE_EXCEEDED",method="GetToken",outcome="error"}"#;
    let mut seen = HashMap::new();
    for _ in 0..100 {
        seen = series(&scrape(&stack).await);
        if seen
            .keys()
            .any(|k| k.starts_with("tokenbroker_requests_total{"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen.get(key).copied(), Some(1.0), "{seen:#?}");
    gate.add_permits(1000);
    stack.stop().await;
}
