//! Logging and tracing: `tracing` with a human or JSON format and an env-filter level, plus
//! an OpenTelemetry layer so spans carry W3C trace context (extracted from incoming gRPC
//! metadata, injected into outgoing Key Vault and Entra requests) and are exported over
//! OTLP (http/protobuf) when `[telemetry] otlp_endpoint` is set.
//!
//! Log lines are written to stderr by a thread of their own, in batches (`lines::Lines`): a
//! request only appends its line to its thread's buffer, and wakes no thread. A stalled
//! reader of stderr (a full pipe, a slow log shipper) must not stop the runtime's threads,
//! so when a buffer is full, lines are dropped and counted (`tokenbroker_log_lines_dropped`).
//! The audit trail is not a log: it never drops.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};
use crate::lines::{self, Lines, WhenFull};

/// Bytes of log lines a thread's buffer holds while stderr does not keep up; beyond them
/// lines are dropped (and counted) rather than making a request wait for the reader. About
/// 600 typical lines per thread per batch; with a buffer per thread stripe (two per core, at
/// most 64) and the batch being written, at most 16 MiB in all.
const LOG_BUFFER_BYTES: usize = 128 * 1024;

/// How long the end of the process waits for stderr to take the last log lines: a reader
/// that has stopped must not keep the process from exiting.
const LOG_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Keeps the trace exporter and the log writer alive; when dropped (at the end of `serve`)
/// it flushes the exporter, then writes out the log lines still buffered.
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
    log: Option<Arc<Lines>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        if let Some(log) = self.log.take() {
            log.close(Some(LOG_CLOSE_WAIT));
        }
    }
}

/// Log lines dropped so far because stderr did not keep up or failed (0 before a subscriber
/// is installed).
pub fn dropped_log_lines() -> u64 {
    LOG.get().map_or(0, |l| l.full_count() + l.lost())
}

static LOG: OnceLock<Arc<Lines>> = OnceLock::new();

/// The fmt layer's writer: each event's line, formatted whole, is appended to the log's
/// buffer of the calling thread. Without a log thread (none could be started), lines go to
/// stderr directly.
struct LogWriter(Option<Arc<Lines>>);

enum LogLine<'a> {
    Buffered(&'a Lines),
    Direct(std::io::Stderr),
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        match &self.0 {
            Some(lines) => LogLine::Buffered(lines),
            None => LogLine::Direct(std::io::stderr()),
        }
    }
}

impl std::io::Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogLine::Buffered(lines) => {
                lines.append(|b| b.extend_from_slice(buf));
                Ok(buf.len())
            }
            LogLine::Direct(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogLine::Buffered(_) => Ok(()),
            LogLine::Direct(e) => e.flush(),
        }
    }
}

/// Installs the global subscriber without trace export (the emulator's). Keep the guard
/// until the process ends; a second installation is a no-op.
pub fn init(format: LogFormat, level: &str) -> Guard {
    install(format, level, None)
}

/// Installs the global subscriber with the configured trace sampling and export.
pub fn init_with(format: LogFormat, level: &str, telemetry: &TelemetryConfig) -> Guard {
    install(format, level, Some(telemetry))
}

fn install(format: LogFormat, level: &str, telemetry: Option<&TelemetryConfig>) -> Guard {
    let (subscriber, guard) = subscriber(format, level, telemetry);
    if subscriber.try_init().is_ok() {
        if let Some(l) = &guard.log {
            let _ = LOG.set(l.clone());
        }
        guard
    } else {
        Guard::default()
    }
}

/// The subscriber `serve` installs (filter, OpenTelemetry layer, log format, the log writer
/// thread), and the guard of its tracer provider and writer; benchmarks install it to
/// measure the broker as it runs.
pub fn subscriber(
    format: LogFormat,
    level: &str,
    telemetry: Option<&TelemetryConfig>,
) -> (Box<dyn tracing::Subscriber + Send + Sync>, Guard) {
    let filter = EnvFilter::try_from_env("TOKENBROKER_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = tracer_provider(telemetry);
    // Without export the layer still gives spans trace ids, so incoming trace context
    // reaches Key Vault and Entra. Its own level, not the log's: a quieter log (`warn`) must
    // not switch off the spans, their export, or the trace context sent upstream.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tokenbroker"))
        .with_filter(LevelFilter::INFO);
    let log = Lines::spawn(
        Box::new(std::io::stderr()),
        lines::Options {
            thread: "tokenbroker-log",
            limit: LOG_BUFFER_BYTES,
            when_full: WhenFull::Drop,
            report_errors_as: None,
            keep_on_error: None,
            // A stalled log is dropped from, not waited for: nothing asks.
            stall: None,
        },
    )
    .map(Arc::new)
    .ok();
    let writer = LogWriter(log.clone());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colours());
    // Request spans are for traces: the log would format their fields on every request,
    // whereas the events worth logging carry the request id themselves.
    let no_request_spans = tracing_subscriber::filter::filter_fn(|m| {
        !(m.is_span() && m.target() == crate::api::REQUEST_SPAN_TARGET)
    });
    let registry = tracing_subscriber::registry().with(otel);
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
        LogFormat::Json => Box::new(
            registry.with(
                fmt.json()
                    .flatten_event(true)
                    .with_filter(no_request_spans)
                    .with_filter(filter),
            ),
        ),
        LogFormat::Human => {
            Box::new(registry.with(fmt.with_filter(no_request_spans).with_filter(filter)))
        }
    };
    let guard = Guard {
        provider: Some(provider),
        log,
    };
    (subscriber, guard)
}

/// Colours only for a person at a terminal: a file or a log collector would keep the escape
/// codes. `NO_COLOR` (<https://no-color.org>) turns them off at a terminal too.
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The tracer provider: parent-based sampling at the configured ratio, OTLP batch export
/// when an endpoint is set. Without an endpoint nothing would receive new traces, so they
/// are not recorded (recording costs on every request); a caller's sampled trace is still
/// followed, and every span still has the trace id that reaches Key Vault and Entra.
pub fn tracer_provider(telemetry: Option<&TelemetryConfig>) -> SdkTracerProvider {
    let mut b = SdkTracerProvider::builder();
    if let Some(t) = telemetry {
        let root = if t.otlp_endpoint.is_some() {
            Sampler::TraceIdRatioBased(t.sampling_ratio)
        } else {
            Sampler::AlwaysOff
        };
        b = b
            .with_resource(resource(t))
            .with_sampler(Sampler::ParentBased(Box::new(root)));
        if let Some(url) = &t.otlp_endpoint {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(signal_url(url, "traces"))
                .build()
            {
                Ok(e) => b = b.with_batch_exporter(e),
                Err(e) => eprintln!("tokenbroker: OTLP trace export disabled: {e}"),
            }
        }
    }
    b.build()
}

/// `service.name` and `service.version`.
pub fn resource(t: &TelemetryConfig) -> Resource {
    Resource::builder()
        .with_service_name(t.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// The OTLP metric exporter, when an endpoint is configured.
pub fn otlp_metric_exporter(t: &TelemetryConfig) -> Option<opentelemetry_otlp::MetricExporter> {
    let url = t.otlp_endpoint.as_ref()?;
    match opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(signal_url(url, "metrics"))
        .build()
    {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "OTLP metric export disabled");
            None
        }
    }
}

/// `{base}/v1/{signal}`, the OTLP/HTTP path for a signal under a collector base URL.
fn signal_url(base: &url::Url, signal: &str) -> String {
    format!("{}/v1/{signal}", base.as_str().trim_end_matches('/'))
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of a gRPC request's metadata, when
/// it carries a valid one.
pub fn remote_context(metadata: &tonic::metadata::MetadataMap) -> Option<opentelemetry::Context> {
    // Most requests carry no trace context: one header lookup instead of the propagator.
    metadata.get("traceparent")?;
    let cx = TraceContextPropagator::new().extract(&Metadata(metadata));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of a remote context (before it is first entered).
pub fn set_parent(span: &tracing::Span, cx: Option<opentelemetry::Context>) {
    if let Some(cx) = cx {
        let _ = span.set_parent(cx);
    }
}

struct Headers(Vec<(&'static str, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// The W3C trace-context headers of the current span, for an outgoing request (none when
/// the span is not recorded).
pub fn trace_headers() -> Vec<(&'static str, String)> {
    let cx = tracing::Span::current().context();
    let mut h = Headers(Vec::new());
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut h);
    }
    h.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_urls_append_the_otlp_path() {
        let u = url::Url::parse("http://collector:4318").unwrap();
        assert_eq!(signal_url(&u, "traces"), "http://collector:4318/v1/traces");
        let u = url::Url::parse("http://collector:4318/otlp/").unwrap();
        assert_eq!(
            signal_url(&u, "metrics"),
            "http://collector:4318/otlp/v1/metrics"
        );
    }

    #[test]
    fn no_headers_outside_a_trace() {
        assert!(trace_headers().is_empty());
    }
}
