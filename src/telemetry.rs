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
//!
//! An OTLP export the collector refuses (an HTTP error status) or that never reaches it is
//! counted per signal (`tokenbroker_telemetry_export_failures`) and logged as a warning at
//! most once a minute per signal (`Reporting`, wrapped around each exporter): the SDK itself
//! reports export errors only through its internal logging, which is not built in.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
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
            let endpoint = signal_url(url, "traces");
            match otlp_http_client(t).and_then(|client| {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(&endpoint)
                    .build()
                    .map_err(|e| e.to_string())
            }) {
                Ok(e) => b = b.with_batch_exporter(Reporting::new(e, Signal::Traces, &endpoint)),
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
pub fn otlp_metric_exporter(
    t: &TelemetryConfig,
) -> Option<Reporting<opentelemetry_otlp::MetricExporter>> {
    let url = t.otlp_endpoint.as_ref()?;
    let endpoint = signal_url(url, "metrics");
    match otlp_http_client(t).and_then(|client| {
        opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(&endpoint)
            .build()
            .map_err(|e| e.to_string())
    }) {
        Ok(e) => Some(Reporting::new(e, Signal::Metrics, &endpoint)),
        Err(e) => {
            tracing::warn!(error = %e, "OTLP metric export disabled");
            None
        }
    }
}

/// How long one OTLP export may take (the OTLP exporters' default).
const OTLP_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP exporters' HTTP client: the exporter's own default (blocking reqwest, on the
/// batch processors' threads; the environment's proxy), trusting the outbound extra CA
/// bundle beside the platform's roots, which the exporter's own client does not.
fn otlp_http_client(t: &TelemetryConfig) -> Result<reqwest::blocking::Client, String> {
    let mut builder = reqwest::blocking::Client::builder().timeout(OTLP_TIMEOUT);
    if let Some(path) = &t.extra_ca_file {
        let certs = crate::outbound::extra_ca_certs(path).map_err(|e| e.to_string())?;
        builder = builder.tls_certs_merge(certs);
    }
    // Built on a thread of its own, as the exporter builds its default: the blocking client
    // starts a runtime of its own, which cannot be done from within the broker's.
    std::thread::Builder::new()
        .name("tokenbroker-otlp-client".into())
        .spawn(move || builder.build())
        .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))?
        .join()
        .map_err(|_| "cannot build the OTLP HTTP client".to_string())?
        .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))
}

/// `{base}/v1/{signal}`, the OTLP/HTTP path for a signal under a collector base URL.
fn signal_url(base: &url::Url, signal: &str) -> String {
    format!("{}/v1/{signal}", base.as_str().trim_end_matches('/'))
}

/// An OTLP signal the broker exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    pub const ALL: [Signal; 2] = [Signal::Traces, Signal::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }

    /// The process's failure record of this signal: the exporters are the process's.
    fn failures(self) -> &'static ExportFailures {
        static TRACES: ExportFailures = ExportFailures::new();
        static METRICS: ExportFailures = ExportFailures::new();
        match self {
            Signal::Traces => &TRACES,
            Signal::Metrics => &METRICS,
        }
    }
}

/// OTLP exports of `signal` that failed in this process so far (the collector answered an
/// error status, could not be reached, or did not answer in time).
pub fn export_failures(signal: Signal) -> u64 {
    signal.failures().count()
}

/// At most one warning per signal in this span: a collector that is down fails every batch
/// (traces every few seconds), and the counter has them all.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Failed exports of one signal, and when the last one was logged.
#[derive(Debug)]
struct ExportFailures {
    count: AtomicU64,
    /// When the last warning was logged, and the count it included.
    warned: Mutex<Option<(Instant, u64)>>,
}

impl ExportFailures {
    const fn new() -> ExportFailures {
        ExportFailures {
            count: AtomicU64::new(0),
            warned: Mutex::new(None),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Counts a failure at `now`; when a warning is due (the first failure, or the first a
    /// minute after the last warning), the failures since that warning that were not logged.
    fn failed(&self, now: Instant) -> Option<u64> {
        let count = self.count.fetch_add(1, Relaxed) + 1;
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        match *warned {
            Some((at, _)) if now.saturating_duration_since(at) < WARN_EVERY => None,
            last => {
                *warned = Some((now, count));
                Some(last.map_or(0, |(_, logged)| count.saturating_sub(logged + 1)))
            }
        }
    }
}

/// An OTLP exporter whose failures are seen: each is counted per signal
/// (`tokenbroker_telemetry_export_failures`) and a warning is logged at most once a minute
/// per signal, naming the endpoint and the cause (the SDK's status or transport summary,
/// never a payload). The SDK would drop the batch silently: its own error reports go to
/// internal logging that is not built in.
///
/// The warning is an event outside any span on the exporter's own thread: the
/// OpenTelemetry layer records events only into spans, and the broker exports no logs, so
/// a warning never becomes something to export (no loop through a failing collector).
#[derive(Debug)]
pub struct Reporting<E> {
    inner: E,
    signal: Signal,
    /// The signal's URL as logged: without a query or fragment.
    endpoint: String,
    failures: &'static ExportFailures,
}

impl<E> Reporting<E> {
    /// Wraps `inner`, the exporter of `signal` to `endpoint`.
    pub fn new(inner: E, signal: Signal, endpoint: &str) -> Reporting<E> {
        Reporting::with_failures(inner, signal, endpoint, signal.failures())
    }

    fn with_failures(
        inner: E,
        signal: Signal,
        endpoint: &str,
        failures: &'static ExportFailures,
    ) -> Reporting<E> {
        let endpoint = match url::Url::parse(endpoint) {
            Ok(mut u) => {
                u.set_query(None);
                u.set_fragment(None);
                u.to_string()
            }
            Err(_) => endpoint.to_owned(),
        };
        Reporting {
            inner,
            signal,
            endpoint,
            failures,
        }
    }

    fn observe(&self, result: OTelSdkResult) -> OTelSdkResult {
        if let Err(e) = &result
            && let Some(unlogged) = self.failures.failed(Instant::now())
        {
            tracing::warn!(
                signal = self.signal.as_str(),
                endpoint = %self.endpoint,
                error = %export_cause(e),
                failures_not_logged = unlogged,
                "OTLP export failed, the batch is lost; logged at most once a minute per signal, tokenbroker_telemetry_export_failures counts every failure"
            );
        }
        result
    }
}

/// The cause of a failed export as logged: the SDK's own summary (`HTTP export failed with
/// status code: 500`, `network error`, a timeout), bounded. The SDK keeps a connection
/// failure's detail to itself, so what to check is added.
fn export_cause(e: &OTelSdkError) -> String {
    let mut cause: String = e.to_string().chars().take(200).collect();
    if cause.contains("network error") {
        cause.push_str(
            " (the collector was not reached: check the endpoint's host and port, DNS and egress rules)",
        );
    }
    cause
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.observe(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Reporting<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.observe(result)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn shutdown(&self) -> OTelSdkResult {
        self.inner.shutdown()
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
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

/// A per-second allowance of log lines for one kind of line, shared by every thread that
/// writes it: a flood of alike events (refused requests, failed fetches of many keys in an
/// outage) must not flood the log. The next line written says how many were held back.
#[derive(Debug, Default)]
pub struct LogBudget {
    /// The Unix second the allowance is for.
    second: AtomicU64,
    used: std::sync::atomic::AtomicU32,
    /// Lines not written since the last one that was.
    held_back: AtomicU64,
}

impl LogBudget {
    pub const fn new() -> LogBudget {
        LogBudget {
            second: AtomicU64::new(0),
            used: std::sync::atomic::AtomicU32::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written in `second`, at most `per_second` a second; if so, how
    /// many were held back before it. Approximate under races (a line or two more or less),
    /// never blocking.
    pub fn admit(&self, second: u64, per_second: u32) -> Option<u64> {
        let current = self.second.load(Relaxed);
        // A later second; or one well before (a wall clock stepped back must not hold every
        // line back until it has caught up again), but not a caller a moment late across a
        // second's turn.
        if (second > current || second.saturating_add(60) < current)
            && self
                .second
                .compare_exchange(current, second, Relaxed, Relaxed)
                .is_ok()
        {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < per_second {
            Some(self.held_back.swap(0, Relaxed))
        } else {
            self.held_back.fetch_add(1, Relaxed);
            None
        }
    }
}

/// A log written to memory, for unit tests that check what is logged (a `MakeWriter` by
/// cloning).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

/// What keeps a `CapturedLog` installed as the thread's subscriber; dropping it ends that.
#[cfg(test)]
pub(crate) struct Capturing {
    _default: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

#[cfg(test)]
impl CapturedLog {
    /// Installs a subscriber writing to this log as the current thread's (and, on a
    /// current-thread runtime, its tasks') until the guard is dropped.
    ///
    /// With one subscriber registered in the process, tracing asks only the current
    /// thread's when a callsite is first hit: another test's thread, without one, would turn
    /// that callsite off for all and this log would miss its lines. A second one makes it
    /// ask every registered subscriber.
    pub(crate) fn install(&self) -> Capturing {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let default = tracing::subscriber::set_default(subscriber);
        let second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        tracing::callsite::rebuild_interest_cache();
        Capturing {
            _default: default,
            _second: second,
        }
    }

    /// Everything logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
impl std::io::Write for CapturedLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_bounded_per_second_and_the_next_line_counts_those_held_back() {
        const T: u64 = 1_700_000_000;
        let b = LogBudget::default();
        for _ in 0..20 {
            assert_eq!(b.admit(T, 20), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(b.admit(T, 20), None);
        }
        assert_eq!(
            b.admit(T + 1, 20),
            Some(7),
            "a new second: the count of lines held back"
        );
        assert_eq!(b.admit(T + 1, 20), Some(0));
        // A late caller with an earlier second does not reset the allowance.
        assert_eq!(b.admit(T, 20), Some(0));
        for _ in 0..17 {
            assert!(b.admit(T + 1, 20).is_some());
        }
        assert_eq!(b.admit(T + 1, 20), None);
        // The wall clock stepped back an hour: lines are written again at once.
        assert_eq!(b.admit(T + 1 - 3600, 20), Some(1));
    }

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

    #[test]
    fn export_failures_are_all_counted_and_warned_of_at_most_once_a_minute() {
        let f = ExportFailures::new();
        let t0 = Instant::now();
        assert_eq!(f.failed(t0), Some(0), "the first failure is logged");
        assert_eq!(f.failed(t0 + Duration::from_secs(1)), None);
        assert_eq!(f.failed(t0 + Duration::from_secs(59)), None);
        // A minute on: logged, with the two that were not.
        assert_eq!(f.failed(t0 + WARN_EVERY), Some(2));
        assert_eq!(f.failed(t0 + WARN_EVERY + Duration::from_secs(1)), None);
        assert_eq!(f.count(), 5);
    }

    /// A span exporter that fails with `error`, or succeeds without one.
    #[derive(Debug)]
    struct Answers(Option<&'static str>);

    impl SpanExporter for Answers {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            match self.0 {
                Some(e) => Err(OTelSdkError::InternalFailure(e.into())),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn a_wrapped_exporter_counts_its_failures_and_passes_its_results_on() {
        let failures: &'static ExportFailures = Box::leak(Box::new(ExportFailures::new()));
        let endpoint = "http://collector:4318/v1/traces?key=x#f";
        let failing = Reporting::with_failures(
            Answers(Some("HTTP export failed with status code: 500")),
            Signal::Traces,
            endpoint,
            failures,
        );
        assert_eq!(failing.endpoint, "http://collector:4318/v1/traces");
        let e = futures::executor::block_on(failing.export(Vec::new())).unwrap_err();
        assert!(export_cause(&e).contains("status code: 500"), "{e}");
        let unreachable = OTelSdkError::InternalFailure("HTTP export failed: network error".into());
        assert!(
            export_cause(&unreachable).contains("check the endpoint's host and port"),
            "{}",
            export_cause(&unreachable)
        );
        futures::executor::block_on(failing.export(Vec::new())).unwrap_err();
        let working = Reporting::with_failures(Answers(None), Signal::Traces, endpoint, failures);
        futures::executor::block_on(working.export(Vec::new())).unwrap();
        assert_eq!(failures.count(), 2);
    }
}
