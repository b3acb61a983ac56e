//! Micro benchmarks of the cache-hit path's pieces: the cache lookup through the broker, the
//! assertion's header+claims encoding, policy evaluation, token fingerprinting, scope
//! normalisation, the audit record, and a caller's bearer token (checked in full, and
//! remembered). `cargo bench --bench hot_path`.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tokenbroker::assertion::{AssertionParams, signing_input};
use tokenbroker::audit::AuditRecord;
use tokenbroker::bench::fake::random_token;
use tokenbroker::bench::memory::{fake_broker, fill, key_request};
use tokenbroker::broker::normalise_scopes;
use tokenbroker::config::{SigningAlgorithm, ThumbprintHeader};
use tokenbroker::policy::Policy;
use tokenbroker::sensitive::fingerprint;
use tokenbroker::signer::{CertificateInfo, KeyRef};
use url::Url;

const GRAPH: &str = "https://graph.microsoft.com/.default";

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (broker, _dir) = fake_broker(100, 1536).unwrap();
    // 10k keys cached, so the lookup is not in a trivially small map.
    rt.block_on(fill(&broker, 0, 10_000)).unwrap();
    let req = key_request(4242);
    c.bench_function("broker_get_token_cache_hit", |b| {
        // The request is cloned outside the timing: a decoded request is moved in.
        b.to_async(&rt).iter_batched(
            || req.clone(),
            |r| async { black_box(broker.get_token(r).await.unwrap()) },
            BatchSize::SmallInput,
        )
    });
}

/// A null audit sink, to separate the audit write from the rest of the handler.
#[derive(Debug)]
struct NullSink;

impl tokenbroker::audit::AuditSink for NullSink {
    fn write(&self, record: AuditRecord) {
        black_box(record);
    }
}

/// The whole gRPC handler (`api::Service::get_token`: request id, authentication as the dev
/// loopback caller, rate limit, policy, cache hit, audit, response) without the network, on a
/// current-thread runtime; with the audit record written to a file (as `tokenbroker dev` and
/// `audit.output = "file"` do) or dropped, and with an info-level log subscriber writing to
/// nowhere (as `serve` runs with `log.level = "info"`).
fn api_handler(c: &mut Criterion) {
    use std::sync::Arc;
    use tokenbroker::proto::token_broker_server::TokenBroker;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tokenbroker::bench::TempDir::new("api-bench").unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n\n[callers]\ndev_loopback = true\n\n\
         [[policy.grant]]\ncallers = [\"dev:loopback\"]\ntenants = [\"*\"]\nscopes = [\"*\"]\n\n\
         [limits]\ncaller_rate_per_sec = 1000000000.0\ncaller_burst = 1000000000\n\n\
         [audit]\noutput = \"file\"\nfile = \"{}\"\n",
        audit.display()
    );
    toml.push_str(
        "\n[tenants.contoso]\ntenant_id = \"c0c0c0c0-0000-4000-8000-00000000c001\"\n\
         client_id = \"c0c0c0c0-a990-4000-8000-000000000a01\"\n\
         credential = { type = \"key_vault_certificate\", vault_url = \"https://bench.vault.azure.net\", certificate = \"c\" }\n",
    );
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, toml).unwrap();
    let config = tokenbroker::config::Config::load(&path, &|_| None).unwrap();
    let broker = tokenbroker::broker::Broker::new(
        &config,
        tokenbroker::broker::Upstreams {
            signer: Arc::new(tokenbroker::bench::fake::FakeSigner),
            hsm: Arc::new(tokenbroker::bench::fake::FakeSigner),
            identity: Arc::new(tokenbroker::identity::ManagedIdentityAssertions::new(
                Default::default(),
            )),
            exchange: Arc::new(tokenbroker::bench::fake::FakeExchange::default()),
            clock: Arc::new(tokenbroker::clock::SystemClock),
        },
    );
    let http = reqwest::Client::new();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let file_access =
        Arc::new(tokenbroker::access::Access::from_config(&config, http.clone()).unwrap());
    let null_access = Arc::new(
        tokenbroker::access::Access::with_sink(&config, http, Arc::new(NullSink)).unwrap(),
    );
    let with_file = tokenbroker::api::Service::new(broker.clone(), stopped.clone(), file_access);
    let with_null = tokenbroker::api::Service::new(broker, stopped, null_access);
    let request = || {
        let mut r = tonic::Request::new(tokenbroker::proto::GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        });
        r.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: Some("127.0.0.1:50051".parse().unwrap()),
                remote_addr: Some("127.0.0.1:40000".parse().unwrap()),
            });
        r
    };
    rt.block_on(with_file.get_token(request())).unwrap();
    let mut g = c.benchmark_group("api_get_token_cache_hit");
    g.bench_function("audit_file", |b| {
        b.iter(|| black_box(rt.block_on(with_file.get_token(request())).unwrap()))
    });
    g.bench_function("audit_null", |b| {
        b.iter(|| black_box(rt.block_on(with_null.get_token(request())).unwrap()))
    });
    // The subscriber `serve` installs, with its defaults (info, no trace export).
    let (subscriber, _guard) = tokenbroker::telemetry::subscriber(
        tokenbroker::config::LogFormat::Human,
        "info",
        Some(&tokenbroker::config::TelemetryConfig {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "bench".into(),
            metrics_interval: std::time::Duration::from_secs(60),
            extra_ca_file: None,
        }),
    );
    tracing::subscriber::with_default(subscriber, || {
        g.bench_function("audit_file_info_log", |b| {
            b.iter(|| black_box(rt.block_on(with_file.get_token(request())).unwrap()))
        });
    });
    g.finish();
    // Measure the bare baseline's handler too: a clone of a constant response.
    let resp = rt
        .block_on(with_null.get_token(request()))
        .unwrap()
        .into_inner();
    c.bench_function("baseline_handler_clone_response", |b| {
        b.iter(|| black_box(tonic::Response::new(black_box(&resp).clone())))
    });
}

fn assertion(c: &mut Criterion) {
    let endpoint = Url::parse(
        "https://login.microsoftonline.com/c0c0c0c0-0000-4000-8000-00000000c001/oauth2/v2.0/token",
    )
    .unwrap();
    let cert = CertificateInfo {
        x5t: "3J2mUXr_2ZbtxDF3QqQIjQUmGDY".into(),
        x5t_s256: "m5Hq2Kq5x3lQ4Q2Hkq0S0nqzV6F2X3e6Y9u8vDqk4x0".into(),
        key: KeyRef {
            vault_url: Url::parse("https://tb-demo.vault.azure.net").unwrap(),
            name: "contoso-app".into(),
            version: "0123456789abcdef0123456789abcdef".into(),
        },
        version: "0123456789abcdef0123456789abcdef".into(),
        not_after: None,
    };
    let p = AssertionParams {
        token_endpoint: &endpoint,
        client_id: "c0c0c0c0-a990-4000-8000-000000000a01",
        algorithm: SigningAlgorithm::RS256,
        thumbprint: ThumbprintHeader::Both,
        now: 1_780_000_000,
    };
    c.bench_function("assertion_signing_input", |b| {
        b.iter(|| black_box(signing_input(black_box(&p), black_box(&cert))))
    });
}

fn policy(c: &mut Criterion) {
    let tenants: BTreeSet<String> = (0..50).map(|i| format!("t{i}")).collect();
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            "[[grant]]\ncallers = [\"spiffe://prod.example/ns/team{i}/*\", \"dns:svc{i}.example\"]\n\
             tenants = [\"t{i}\", \"t{}\"]\nscopes = [\"{GRAPH}\", \"api://app{i}/.default\"]\n",
            i + 20
        ));
    }
    let p = Policy::parse(&text, &tenants).unwrap();
    let scopes = vec![GRAPH.to_string(), "api://app19/.default".to_string()];
    c.bench_function("policy_allows_20_grants", |b| {
        b.iter(|| {
            black_box(p.allows(
                black_box("spiffe://prod.example/ns/team19/sa/collector"),
                black_box("t39"),
                black_box(&scopes),
            ))
        })
    });
}

fn fingerprinting(c: &mut Criterion) {
    let token = random_token(1536);
    c.bench_function("token_fingerprint_1536B", |b| {
        b.iter(|| black_box(fingerprint(black_box(token.as_bytes()))))
    });
}

fn scopes(c: &mut Criterion) {
    let s = vec![GRAPH.to_string()];
    c.bench_function("normalise_scopes_1", |b| {
        b.iter(|| black_box(normalise_scopes(black_box(&s)).is_ok()))
    });
}

fn audit(c: &mut Criterion) {
    let scopes = vec![GRAPH.to_string()];
    let peer = Some("127.0.0.1:50000".parse().unwrap());
    c.bench_function("audit_record_build_and_serialise", |b| {
        b.iter(|| {
            let mut r = AuditRecord::new(
                "GetToken",
                "6f1c9a3e-3f1e-4d7a-9b1e-0c2d3e4f5a6b",
                peer,
                "contoso",
                &scopes,
            );
            r.time = std::time::SystemTime::now();
            r.token_fingerprint = Some(fingerprint(b"token"));
            let mut line = Vec::with_capacity(512);
            r.write_json(&mut line);
            black_box(line)
        })
    });
}

/// A bearer token (RS256, ~1 KB) checked in full (keys already fetched: signature, claims),
/// and the same token again, answered from the verifier's memory of verified tokens.
fn bearer(c: &mut Criterion) {
    use tokenbroker::bench::jwt::{LoopbackIssuer, check_signature};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (issuer, verifier) = rt.block_on(LoopbackIssuer::start()).unwrap();
    let token = issuer.token("collector").unwrap();
    // Fetches the issuer's keys, and remembers the token.
    rt.block_on(verifier.verify(&token, None)).unwrap();
    c.bench_function("bearer_token_rs256_full_check", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(check_signature(&verifier, &token).await.unwrap()) })
    });
    c.bench_function("bearer_token_rs256_remembered", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(verifier.verify(&token, None).await.unwrap()) })
    });
}

criterion_group!(
    benches,
    cache_hit,
    api_handler,
    assertion,
    policy,
    fingerprinting,
    scopes,
    audit,
    bearer
);
criterion_main!(benches);
