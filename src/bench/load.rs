//! Cache-hit load: the broker (warm cache) against a bare tonic server answering the same
//! RPC with a constant response of the same size, driven by one client in the same run.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prost::Message as _;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Response, Status};

use super::{BenchArgs, EmulatorAt, GRAPH, Percentiles, Stack, Transport, line, replace_once, us};
use crate::emulator::EmulatorConfig;
use crate::proto;
use crate::proto::token_broker_client::TokenBrokerClient;
use crate::proto::token_broker_server::{TokenBroker, TokenBrokerServer};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub connections: usize,
    pub streams: usize,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub rounds: usize,
    pub warmup: Duration,
    pub transports: Vec<Transport>,
}

impl From<&BenchArgs> for LoadOptions {
    fn from(a: &BenchArgs) -> Self {
        LoadOptions {
            connections: a.connections.max(1),
            streams: a.streams.max(1),
            duration: Duration::from_secs_f64(a.duration.clamp(0.01, 600.0)),
            requests: a.requests,
            rounds: a.rounds.max(1),
            warmup: Duration::from_secs_f64(a.warmup.clamp(0.0, 60.0)),
            transports: match a.transport {
                Transport::Both => vec![Transport::Plaintext, Transport::Mtls],
                t => vec![t],
            },
        }
    }
}

/// One target's figures over all measured rounds.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStats {
    pub requests: u64,
    pub errors: u64,
    /// Broker answers not served from the cache (should be 0 with a warm cache).
    pub not_from_cache: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub latency: Percentiles,
    /// CPU time of the whole process (client, servers, kernel work on their behalf) per
    /// request: what throughput costs when the cores are saturated, and far less sensitive
    /// than requests/s to a virtual machine whose speed drifts.
    pub cpu_us_per_request: f64,
    /// Requests/s of each round, to show the spread.
    pub rounds_rps: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub transport: Transport,
    pub connections: usize,
    pub streams: usize,
    pub response_bytes: usize,
    pub baseline: TargetStats,
    pub broker: TargetStats,
    /// broker / baseline requests per second over all rounds (target ≥ 0.85).
    pub throughput_ratio: f64,
    /// broker / baseline requests per second of each round, paired with the baseline round
    /// run just before or after it.
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios`: less sensitive to a machine whose speed drifts.
    pub median_round_ratio: f64,
    /// broker / baseline p99 latency (target ≤ 1.3).
    pub p99_ratio: f64,
    pub p50_ratio: f64,
    pub p999_ratio: f64,
    /// baseline / broker CPU per request: the throughput ratio the CPU cost alone gives on
    /// saturated cores.
    pub cpu_ratio: f64,
}

impl LoadReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        line(
            &mut out,
            format!(
                "\n== load: cache-hit GetToken, {:?}, {} connections, {} streams, response {} bytes ==",
                self.transport, self.connections, self.streams, self.response_bytes
            ),
        );
        for (name, s) in [("baseline", &self.baseline), ("broker", &self.broker)] {
            line(
                &mut out,
                format!(
                    "{name:<9} {:>9.0} req/s  {}  ({} requests, {} errors, {} not from cache; rounds {})",
                    s.requests_per_sec,
                    s.latency.row(),
                    s.requests,
                    s.errors,
                    s.not_from_cache,
                    s.rounds_rps
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            );
        }
        line(
            &mut out,
            format!(
                "throughput ratio per round {}, median {:.3}",
                self.round_ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                self.median_round_ratio
            ),
        );
        line(
            &mut out,
            format!(
                "CPU per request (whole process): baseline {:.1}µs, broker {:.1}µs; baseline/broker {:.3}",
                self.baseline.cpu_us_per_request, self.broker.cpu_us_per_request, self.cpu_ratio
            ),
        );
        line(
            &mut out,
            format!(
                "ratio broker/baseline: throughput {:.3} (target ≥ 0.85), p99 {:.3} (target ≤ 1.3), p50 {:.3}, p99.9 {:.3}; broker p99 {} vs {}",
                self.throughput_ratio,
                self.p99_ratio,
                self.p50_ratio,
                self.p999_ratio,
                us(self.broker.latency.p99_us),
                us(self.baseline.latency.p99_us)
            ),
        );
        out
    }
}

/// The bare baseline: `GetToken` answers a constant.
#[derive(Debug, Clone)]
struct Baseline {
    response: Arc<proto::GetTokenResponse>,
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::WatchTokenResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TokenBroker for Baseline {
    async fn get_token(
        &self,
        _request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        Ok(Response::new((*self.response).clone()))
    }

    type WatchTokenStream = WatchStream;

    async fn watch_token(
        &self,
        _request: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// The bare baseline server on a loopback port.
pub struct BareServer {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl BareServer {
    /// Serves `response` to every `GetToken`, with mutual TLS when `pki` is given.
    pub async fn start(
        response: proto::GetTokenResponse,
        pki: Option<&Pki>,
    ) -> anyhow::Result<BareServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = Server::builder();
        if let Some(p) = pki {
            server = server.tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&p.server.0, &p.server.1))
                    .client_ca_root(Certificate::from_pem(&p.ca_pem)),
            )?;
        }
        let serve = server
            .add_service(TokenBrokerServer::new(Baseline {
                response: Arc::new(response),
            }))
            // As `Server::serve(addr)` would: tonic's own listener sets TCP_NODELAY.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            );
        Ok(BareServer {
            addr,
            stop,
            task: tokio::spawn(serve),
        })
    }

    /// Stops serving (bounded).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Test PKI for the mutual TLS runs: a CA, a server certificate for localhost/127.0.0.1 and
/// a client certificate with a SPIFFE ID.
pub struct Pki {
    pub ca_pem: String,
    pub server: (String, String),
    pub client: (String, String),
}

pub const CLIENT_ID: &str = "spiffe://bench.local/load-client";

impl Pki {
    pub fn generate() -> anyhow::Result<Pki> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        let now = time::OffsetDateTime::now_utc();
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, "tokenbroker bench CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(2);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
        let leaf = |mut p: CertificateParams,
                    usage: ExtendedKeyUsagePurpose|
         -> anyhow::Result<(String, String)> {
            p.extended_key_usages = vec![usage];
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(2);
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let mut sp = CertificateParams::new(vec!["localhost".to_string()])?;
        sp.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        let server = leaf(sp, ExtendedKeyUsagePurpose::ServerAuth)?;
        let mut cp = CertificateParams::new(Vec::<String>::new())?;
        cp.distinguished_name
            .push(DnType::CommonName, "bench load client");
        cp.subject_alt_names
            .push(SanType::URI(CLIENT_ID.to_string().try_into()?));
        let client = leaf(cp, ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(Pki {
            ca_pem: ca.pem(),
            server,
            client,
        })
    }

    fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.client.0, &self.client.1))
            .domain_name("localhost")
    }
}

/// The dev configuration turned into a mutual-TLS listener that requires client certificates,
/// with one grant for the bench client (no dev identity).
pub fn mtls_config(dev: String, dir: &Path, pki: &Pki) -> anyhow::Result<String> {
    let write = |name: &str, content: &str| -> anyhow::Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, content)?;
        Ok(p.display().to_string().replace('\\', "\\\\"))
    };
    let cert = write("server.crt", &pki.server.0)?;
    let key = write("server.key", &pki.server.1)?;
    let ca = write("callers-ca.pem", &pki.ca_pem)?;
    let t = replace_once(
        &dev,
        "plaintext = true",
        &format!(
            "tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\nclient_ca_file = \"{ca}\"\nclient_cert = \"required\""
        ),
    )?;
    let t = replace_once(&t, "dev_loopback = true", "dev_loopback = false")?;
    replace_once(
        &t,
        "callers = [\"dev:loopback\"]\ntenants = [\"*\"]\nscopes = [\"*\"]",
        &format!(
            "callers = [\"{CLIENT_ID}\"]\ntenants = [\"contoso\", \"fabrikam\"]\nscopes = [\"{GRAPH}\"]"
        ),
    )
}

async fn channels(addr: SocketAddr, tls: Option<&Pki>, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // TLS checks the server certificate against `localhost` (domain_name).
        let url = match tls {
            Some(_) => format!("https://{addr}"),
            None => format!("http://{addr}"),
        };
        let mut e = Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true);
        if let Some(p) = tls {
            e = e.tls_config(p.client_tls())?;
        }
        out.push(
            e.connect()
                .await
                .with_context(|| format!("connecting to {addr}"))?,
        );
    }
    Ok(out)
}

fn request() -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    }
}

/// The request, with `bearer` as its authorization metadata when given.
fn with_bearer(
    r: proto::GetTokenRequest,
    bearer: Option<&tonic::metadata::AsciiMetadataValue>,
) -> Request<proto::GetTokenRequest> {
    let mut r = Request::new(r);
    if let Some(b) = bearer {
        r.metadata_mut().insert("authorization", b.clone());
    }
    r
}

/// The bench client's identity in the bearer runs: `jwt:bench:collector`.
const BEARER_SUBJECT: &str = "collector";

/// The dev configuration with bearer-JWT callers of the bench issuer instead of the dev
/// identity, and one grant for the bench client.
pub fn bearer_config(dev: String, issuer: &str) -> anyhow::Result<String> {
    let t = replace_once(
        &dev,
        "dev_loopback = true",
        &format!(
            "dev_loopback = false\naudience = \"{}\"\n\n[callers.issuers.bench]\nissuer = \"{issuer}\"\nalgorithms = [\"RS256\"]",
            super::jwt::AUDIENCE
        ),
    )?;
    replace_once(
        &t,
        "callers = [\"dev:loopback\"]\ntenants = [\"*\"]\nscopes = [\"*\"]",
        &format!(
            "callers = [\"jwt:bench:{BEARER_SUBJECT}\"]\ntenants = [\"contoso\", \"fabrikam\"]\nscopes = [\"{GRAPH}\"]"
        ),
    )
}

/// What one drive of a target produced.
#[derive(Debug, Default)]
pub struct Drive {
    pub latencies_ns: Vec<u64>,
    pub errors: u64,
    pub not_from_cache: u64,
    pub elapsed: Duration,
    /// Process CPU time used while driving (zero where it cannot be read).
    pub cpu: Duration,
}

/// `streams` concurrent callers over `channels`, until `duration` has passed or `requests`
/// were sent, whichever comes first; each request with `bearer` as its authorization.
pub async fn drive(
    channels: &[Channel],
    streams: usize,
    duration: Duration,
    requests: Option<u64>,
    bearer: Option<&tonic::metadata::AsciiMetadataValue>,
) -> Drive {
    let issued = Arc::new(AtomicU64::new(0));
    let cpu = super::process_cpu();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut client = TokenBrokerClient::new(channels[i % channels.len()].clone());
        let issued = issued.clone();
        let bearer = bearer.cloned();
        tasks.push(tokio::spawn(async move {
            let mut d = Drive {
                latencies_ns: Vec::with_capacity(4096),
                ..Default::default()
            };
            loop {
                if requests.is_some_and(|max| issued.fetch_add(1, Ordering::Relaxed) >= max)
                    || Instant::now() >= deadline
                {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .get_token(with_bearer(request(), bearer.as_ref()))
                    .await;
                let ns = t.elapsed().as_nanos() as u64;
                match r {
                    Ok(resp) => {
                        d.latencies_ns.push(ns);
                        if resp.get_ref().source != proto::TokenSource::Cache as i32 {
                            d.not_from_cache += 1;
                        }
                    }
                    Err(_) => d.errors += 1,
                }
            }
            d
        }));
    }
    let mut all = Drive::default();
    for t in tasks {
        if let Ok(d) = t.await {
            all.latencies_ns.extend(d.latencies_ns);
            all.errors += d.errors;
            all.not_from_cache += d.not_from_cache;
        } else {
            all.errors += 1;
        }
    }
    all.elapsed = start.elapsed();
    all.cpu = super::process_cpu().saturating_sub(cpu);
    all
}

struct Acc {
    latencies: Vec<u64>,
    errors: u64,
    not_from_cache: u64,
    seconds: f64,
    cpu: Duration,
    rounds: Vec<f64>,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            latencies: Vec::new(),
            errors: 0,
            not_from_cache: 0,
            seconds: 0.0,
            cpu: Duration::ZERO,
            rounds: Vec::new(),
        }
    }

    fn add(&mut self, d: Drive) {
        let s = d.elapsed.as_secs_f64();
        self.rounds.push(d.latencies_ns.len() as f64 / s);
        self.seconds += s;
        self.cpu += d.cpu;
        self.errors += d.errors;
        self.not_from_cache += d.not_from_cache;
        self.latencies.extend(d.latencies_ns);
    }

    fn stats(mut self) -> TargetStats {
        let requests = self.latencies.len() as u64;
        TargetStats {
            requests,
            errors: self.errors,
            not_from_cache: self.not_from_cache,
            seconds: self.seconds,
            requests_per_sec: requests as f64 / self.seconds.max(1e-9),
            latency: Percentiles::of(&mut self.latencies),
            cpu_us_per_request: self.cpu.as_secs_f64() * 1e6 / requests.max(1) as f64,
            rounds_rps: self.rounds,
        }
    }
}

/// The median (the mean of the middle two for an even count); NaN when empty.
fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the load comparison for each transport asked for.
pub async fn run(opts: &LoadOptions) -> anyhow::Result<Vec<LoadReport>> {
    let mut out = Vec::new();
    for t in &opts.transports {
        out.push(run_one(opts, *t).await?);
    }
    Ok(out)
}

async fn run_one(opts: &LoadOptions, transport: Transport) -> anyhow::Result<LoadReport> {
    let pki = match transport {
        Transport::Mtls => Some(Pki::generate()?),
        _ => None,
    };
    let issuer = match transport {
        Transport::Bearer => Some(super::jwt::LoopbackIssuer::start().await?.0),
        _ => None,
    };
    let bearer = match &issuer {
        Some(i) => Some(
            format!("Bearer {}", i.token(BEARER_SUBJECT)?.expose())
                .parse::<tonic::metadata::AsciiMetadataValue>()?,
        ),
        None => None,
    };
    let stack = Stack::start(
        EmulatorAt::InProcess(EmulatorConfig::demo()),
        |dev, dir| match (&pki, &issuer) {
            (Some(p), _) => mtls_config(dev, dir, p),
            (None, Some(i)) => bearer_config(dev, i.issuer()),
            (None, None) => Ok(dev),
        },
        |u| u,
    )
    .await?;
    let result = async {
        // Warm the cache; the baseline answers with this very response (same size).
        let broker_channels = channels(stack.addr, pki.as_ref(), opts.connections).await?;
        let mut warm = TokenBrokerClient::new(broker_channels[0].clone())
            .get_token(with_bearer(request(), bearer.as_ref()))
            .await
            .context("warming the broker's cache")?
            .into_inner();
        warm.source = proto::TokenSource::Cache as i32;
        let response_bytes = warm.encoded_len();

        let baseline = BareServer::start(warm, pki.as_ref()).await?;
        let baseline_channels = channels(baseline.addr, pki.as_ref(), opts.connections).await?;

        if !opts.warmup.is_zero() {
            let b = bearer.as_ref();
            drive(&baseline_channels, opts.streams, opts.warmup, None, b).await;
            drive(&broker_channels, opts.streams, opts.warmup, None, b).await;
        }
        let (mut b, mut k) = (Acc::new(), Acc::new());
        for round in 0..opts.rounds {
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_baseline in order {
                if is_baseline {
                    b.add(
                        drive(
                            &baseline_channels,
                            opts.streams,
                            opts.duration,
                            opts.requests,
                            bearer.as_ref(),
                        )
                        .await,
                    );
                } else {
                    k.add(
                        drive(
                            &broker_channels,
                            opts.streams,
                            opts.duration,
                            opts.requests,
                            bearer.as_ref(),
                        )
                        .await,
                    );
                }
            }
        }
        drop(baseline_channels);
        baseline.stop().await;
        let (baseline, broker) = (b.stats(), k.stats());
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let round_ratios: Vec<f64> = broker
            .rounds_rps
            .iter()
            .zip(&baseline.rounds_rps)
            .map(|(k, b)| ratio(*k, *b))
            .collect();
        let median_round_ratio = median(&round_ratios);
        Ok::<_, anyhow::Error>(LoadReport {
            round_ratios,
            median_round_ratio,
            transport,
            connections: opts.connections,
            streams: opts.streams,
            response_bytes,
            throughput_ratio: ratio(broker.requests_per_sec, baseline.requests_per_sec),
            p99_ratio: ratio(broker.latency.p99_us, baseline.latency.p99_us),
            p50_ratio: ratio(broker.latency.p50_us, baseline.latency.p50_us),
            p999_ratio: ratio(broker.latency.p999_us, baseline.latency.p999_us),
            cpu_ratio: ratio(baseline.cpu_us_per_request, broker.cpu_us_per_request),
            baseline,
            broker,
        })
    }
    .await;
    stack.stop().await;
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_round_ratios() {
        assert_eq!(super::median(&[0.9, 0.7, 0.8]), 0.8);
        assert!((super::median(&[0.9, 0.7, 0.8, 1.0]) - 0.85).abs() < 1e-9);
        assert!(super::median(&[]).is_nan());
    }
}
