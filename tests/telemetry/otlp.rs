//! OTLP export over the wire: `tokenbroker serve` (a process of its own, as deployed, against
//! the emulator) and `tokenbroker dev`, with `TOKENBROKER_OTLP_ENDPOINT` pointing at a
//! collector made here, which decodes what arrives with the OpenTelemetry protocol's own
//! message types.

use std::process::{Command, Stdio};
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
use tokenbroker::emulator::{Emulator, EmulatorConfig, StartOptions};

use crate::helpers::{demo, spawn_dev, terminate, traced_request};

/// What the collector received: (path, content type, body) per request.
type Received = Arc<Mutex<Vec<(String, String, Bytes)>>>;

async fn collect(
    State((path, received)): State<(&'static str, Received)>,
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
    StatusCode::OK
}

/// An OTLP/HTTP collector on loopback, on `rt`: its address and what it receives.
fn start_collector(rt: &tokio::runtime::Runtime) -> (std::net::SocketAddr, Received) {
    let received: Received = Arc::default();
    let collector = rt.block_on(async {
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(collect).with_state(("/v1/traces", received.clone())),
            )
            .route(
                "/v1/metrics",
                post(collect).with_state(("/v1/metrics", received.clone())),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    (collector, received)
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
    let get_token = traces(&received)
        .into_iter()
        .flat_map(|t| t.resource_spans)
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .find(|s| s.name == "GetToken")
        .expect("dev exports the request's span");
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

#[test]
fn traces_and_metrics_reach_an_otlp_collector_and_the_last_metrics_are_sent_at_exit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (collector, received) = start_collector(&rt);

    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorConfig::demo();
    let emulator = rt
        .block_on(Emulator::start(
            emu.clone(),
            StartOptions::new(dir.path().join("ca.pem")),
        ))
        .unwrap();
    // A port for the broker: bound and let go (the child binds it again at once).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        tokenbroker::dev::broker_config_toml(&emu, emulator.endpoints(), addr),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("TOKENBROKER_OTLP_ENDPOINT", format!("http://{collector}"))
        // A quiet log: the log level must not switch off spans and their export.
        .env("TOKENBROKER_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let token = rt.block_on(async {
        // Bounded wait for the child to listen.
        let mut c = None;
        for _ in 0..200 {
            if let Ok(client) = tokenbroker::proto::token_broker_client::TokenBrokerClient::connect(
                format!("http://{addr}"),
            )
            .await
            {
                c = Some(client);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = c.expect("the broker listens");
        let req = traced_request(&format!("00-{trace_id}-00f067aa0ba902b7-01"));
        c.get_token(req).await.unwrap().into_inner()
    });
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
