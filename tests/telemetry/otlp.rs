//! OTLP export over the wire: `tokenbroker serve` (a process of its own, as deployed, against
//! the emulator) and `tokenbroker dev`, with `TOKENBROKER_OTLP_ENDPOINT` pointing at a
//! collector made here, which decodes what arrives with the OpenTelemetry protocol's own
//! message types; and a collector that refuses every export, which the broker's log and
//! metrics must show.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

use crate::helpers::{
    Served, client_when_listening, demo, free_port, serve, serve_also_trusting, spawn_dev,
    terminate, traced_request,
};
use serde_json::Value as Json;

/// What the collector received: (path, content type, body) per request.
type Received = Arc<Mutex<Vec<(String, String, Bytes)>>>;

async fn collect(
    State((path, received, status)): State<(&'static str, Received, StatusCode)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    received
        .lock()
        .unwrap()
        .push((path.to_owned(), content_type, body));
    status
}

/// An OTLP/HTTP collector on loopback, on `rt`: its address and what it receives.
fn start_collector(rt: &tokio::runtime::Runtime) -> (std::net::SocketAddr, Received) {
    start_collector_answering(rt, StatusCode::OK)
}

/// A collector that answers every export with `status`.
fn start_collector_answering(
    rt: &tokio::runtime::Runtime,
    status: StatusCode,
) -> (std::net::SocketAddr, Received) {
    let received: Received = Arc::default();
    let collector = rt.block_on(async {
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(collect).with_state(("/v1/traces", received.clone(), status)),
            )
            .route(
                "/v1/metrics",
                post(collect).with_state(("/v1/metrics", received.clone(), status)),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    (collector, received)
}

/// A collector over HTTPS with a certificate for 127.0.0.1 from a CA of its own, on `rt`:
/// its address, the CA (PEM) and what it receives.
fn start_tls_collector(rt: &tokio::runtime::Runtime) -> (std::net::SocketAddr, String, Received) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let received: Received = Arc::default();
    let addr = rt.block_on(async {
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
            cert.pem().into_bytes(),
            key.serialize_pem().into_bytes(),
        )
        .await
        .unwrap();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(collect).with_state(("/v1/traces", received.clone(), StatusCode::OK)),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = axum_server::from_tcp_rustls(listener, tls);
        tokio::spawn(async move { server.serve(app.into_make_service()).await.unwrap() });
        addr
    });
    (addr, ca.pem(), received)
}

#[test]
fn a_collector_behind_a_private_ca_in_the_extra_bundle_receives_the_traces() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, ca_pem, received) = start_tls_collector(&rt);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("https://{collector}");
    let Served {
        mut child,
        emulator,
        addr,
    } = serve_also_trusting(
        &rt,
        dir.path(),
        "",
        &[("TOKENBROKER_OTLP_ENDPOINT", &endpoint)],
        Stdio::null(),
        &ca_pem,
    );
    let trace_id = "5cf92f3577b34da6a3ce929d0e0e4737";
    traced_token(&rt, addr, &format!("00-{trace_id}-00f067aa0ba902b7-01"));
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    rt.block_on(emulator.shutdown());
    let received = received.lock().unwrap().clone();
    let get_token =
        get_token_span(&received).expect("the request's span reaches the collector over TLS");
    assert_eq!(hex(&get_token.trace_id), trace_id);
}

/// The first `GetToken` span among the trace requests the collector received.
fn get_token_span(
    received: &[(String, String, Bytes)],
) -> Option<opentelemetry_proto::tonic::trace::v1::Span> {
    traces(received)
        .into_iter()
        .flat_map(|t| t.resource_spans)
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .find(|s| s.name == "GetToken")
}

/// The trace requests the collector received, decoded.
fn traces(received: &[(String, String, Bytes)]) -> Vec<ExportTraceServiceRequest> {
    received
        .iter()
        .filter(|(path, _, _)| path == "/v1/traces")
        .map(|(_, _, b)| ExportTraceServiceRequest::decode(b.as_ref()).unwrap())
        .collect()
}

#[test]
fn tokenbroker_dev_exports_traces_and_logs_as_the_environment_says_and_nothing_else() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, received) = start_collector(&rt);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let endpoint = format!("http://{collector}");
    let (mut child, addr) = spawn_dev(
        dir.path(),
        &[
            ("TOKENBROKER_OTLP_ENDPOINT", &endpoint),
            ("TOKENBROKER_LOG_FORMAT", "json"),
            // Wiring, not reporting: the generated configuration keeps its own listener.
            ("TOKENBROKER_LISTEN", "127.0.0.1:1"),
        ],
    );
    assert_ne!(addr, "127.0.0.1:1");
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let token = rt.block_on(async {
        let mut c = tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .unwrap();
        let req = traced_request(&format!("00-{trace_id}-b7ad6b7169203331-01"));
        c.get_token(req).await.unwrap().into_inner()
    });
    assert_eq!(token.tenant_id, demo::CONTOSO_TENANT);
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");

    let received = received.lock().unwrap().clone();
    let get_token = get_token_span(&received).expect("dev exports the request's span");
    assert_eq!(hex(&get_token.trace_id), trace_id);
    // The log is JSON lines, as asked, and holds no token.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("token obtained"), "{log}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
    assert!(!log.contains(&token.access_token));
}

/// A token for contoso from the broker at `addr`, in the trace `traceparent` names; waits
/// (bounded) for the broker to listen.
fn traced_token(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    traceparent: &str,
) -> tokenbroker::proto::GetTokenResponse {
    rt.block_on(async {
        let mut c = client_when_listening(addr).await;
        c.get_token(traced_request(traceparent))
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn traces_and_metrics_reach_an_otlp_collector_and_the_last_metrics_are_sent_at_exit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, received) = start_collector(&rt);

    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{collector}");
    let Served {
        mut child,
        emulator,
        addr,
    } = serve(
        &rt,
        dir.path(),
        "",
        &[
            ("TOKENBROKER_OTLP_ENDPOINT", &endpoint),
            // A quiet log: the log level must not switch off spans and their export.
            ("TOKENBROKER_LOG_LEVEL", "warn"),
        ],
        Stdio::null(),
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let token = traced_token(&rt, addr, &format!("00-{trace_id}-00f067aa0ba902b7-01"));
    assert_eq!(token.tenant_id, demo::CONTOSO_TENANT);

    // The metrics interval is a minute: what the collector gets is the export at shutdown.
    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    rt.block_on(emulator.shutdown());

    let received = received.lock().unwrap().clone();
    for (path, content_type, _) in &received {
        assert_eq!(content_type, "application/x-protobuf", "{path}");
    }
    let bodies = |p: &str| {
        received
            .iter()
            .filter(|(path, _, _)| path == p)
            .map(|(_, _, b)| b.clone())
            .collect::<Vec<_>>()
    };

    // The request's span, in the caller's trace, from the service named as configured.
    let traces = traces(&received);
    let service_names: Vec<String> = traces
        .iter()
        .flat_map(|t| &t.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter(|kv| kv.key == "service.name")
        .filter_map(
            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            },
        )
        .collect();
    assert!(
        service_names.iter().any(|s| s == "tokenbroker"),
        "{service_names:?}"
    );
    let spans: Vec<_> = traces
        .iter()
        .flat_map(|t| &t.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    let get_token = spans
        .iter()
        .find(|s| s.name == "GetToken")
        .unwrap_or_else(|| {
            panic!(
                "no GetToken span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(hex(&get_token.trace_id), trace_id);
    let exchange = spans
        .iter()
        .find(|s| s.name == "entra.exchange")
        .expect("the exchange is exported");
    assert_eq!(hex(&exchange.trace_id), trace_id, "in the caller's trace");

    // The request counted, and its duration recorded in the histogram, by method and outcome.
    let metrics: Vec<_> = bodies("/v1/metrics")
        .iter()
        .map(|b| ExportMetricsServiceRequest::decode(b.as_ref()).unwrap())
        .flat_map(|m| m.resource_metrics)
        .flat_map(|r| r.scope_metrics)
        .flat_map(|s| s.metrics)
        .collect();
    let named = |n: &str| {
        metrics
            .iter()
            .filter(|m| m.name == n)
            .filter_map(|m| m.data.clone())
            .collect::<Vec<_>>()
    };
    let requests: u64 = named("tokenbroker_requests")
        .iter()
        .flat_map(|d| match d {
            Data::Sum(s) => s.data_points.clone(),
            _ => Vec::new(),
        })
        .map(|p| match p.value {
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(n)) => {
                n as u64
            }
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    assert_eq!(requests, 1, "{:?}", named("tokenbroker_requests"));
    let durations: Vec<_> = named("tokenbroker_request_duration_seconds")
        .iter()
        .flat_map(|d| match d {
            Data::Histogram(h) => h.data_points.clone(),
            _ => Vec::new(),
        })
        .collect();
    let ok = durations
        .iter()
        .find(|p| {
            p.attributes.iter().any(|kv| {
                kv.key == "method"
                    && matches!(kv.value.as_ref().and_then(|v| v.value.as_ref()),
                        Some(Value::StringValue(s)) if s == "GetToken")
            })
        })
        .unwrap_or_else(|| panic!("no GetToken duration in {durations:?}"));
    assert_eq!(ok.count, 1);
    assert!(
        !named("tokenbroker_upstream_calls").is_empty(),
        "upstream calls are exported too"
    );

    // Nothing secret went out: no token in any export.
    for (_, _, body) in &received {
        assert!(
            !body
                .windows(token.access_token.len())
                .any(|w| w == token.access_token.as_bytes()),
            "a token in an OTLP export"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_collector_that_refuses_exports_is_counted_per_signal_and_logged_at_most_once_a_minute() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, received) = start_collector_answering(&rt, StatusCode::INTERNAL_SERVER_ERROR);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let endpoint = format!("http://{collector}");
    let admin = free_port().to_string();
    let Served {
        mut child,
        emulator,
        addr,
    } = serve(
        &rt,
        dir.path(),
        "\n[telemetry]\nmetrics_interval_secs = 1\n",
        &[
            ("TOKENBROKER_OTLP_ENDPOINT", &endpoint),
            ("TOKENBROKER_ADMIN_LISTEN", &admin),
            ("TOKENBROKER_LOG_FORMAT", "json"),
            ("TOKENBROKER_LOG_LEVEL", "warn"),
            // The SDK's batch delay: spans go out at once, not after 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
        std::fs::File::create(&log_path).unwrap().into(),
    );
    let token = traced_token(
        &rt,
        addr,
        "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );

    // Every refused export is counted: wait (bounded) for the request's spans to be refused
    // and for the metrics to be refused three times.
    let failures = |text: &str, signal: &str| -> u64 {
        let series = format!("tokenbroker_telemetry_export_failures_total{{signal=\"{signal}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.parse().unwrap())
    };
    let mut counted = (0, 0);
    for _ in 0..600 {
        let text = rt.block_on(async {
            reqwest::get(format!("http://{admin}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        counted = (failures(&text, "traces"), failures(&text, "metrics"));
        if counted.0 >= 1 && counted.1 >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (traces_failed, metrics_failed) = counted;
    assert!(
        traces_failed >= 1 && metrics_failed >= 3,
        "failures counted: {counted:?}"
    );

    let code = terminate(&mut child);
    assert!(code.success(), "exit status {code:?}");
    rt.block_on(emulator.shutdown());
    let paths: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _, _)| p.clone())
        .collect();
    assert!(paths.iter().any(|p| p == "/v1/traces"), "{paths:?}");
    assert!(paths.iter().any(|p| p == "/v1/metrics"), "{paths:?}");

    // A warning per signal, naming the endpoint and the collector's answer.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let warnings: Vec<Json> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("OTLP export failed"))
        })
        .collect();
    for signal in ["traces", "metrics"] {
        let of_signal: Vec<&Json> = warnings.iter().filter(|w| w["signal"] == signal).collect();
        assert!(!of_signal.is_empty(), "no warning for {signal} in:\n{log}");
        for w in &of_signal {
            assert_eq!(w["endpoint"], format!("{endpoint}/v1/{signal}"), "{w}");
            let error = w["error"].as_str().unwrap_or_default();
            assert!(error.contains("status code: 500"), "{w}");
        }
        if signal == "metrics" {
            // At most one a minute: fewer lines than refusals.
            assert!(
                (of_signal.len() as u64) < metrics_failed,
                "{} warnings for {metrics_failed} failures:\n{log}",
                of_signal.len()
            );
        }
    }
    assert!(!log.contains(&token.access_token), "a token in the log");
}
