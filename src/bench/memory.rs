//! Memory: resident set size with 1k, 10k and 100k cached tokens, filled through the broker
//! (`Broker::get_token`, the real cache, flight and refresh scheduling) with fast in-memory
//! upstreams, so the figure is the broker's own memory per token. Keys are spread over 100
//! tenants and up to 1,000 scopes each; every token is a distinct random string.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use super::fake::{FakeExchange, FakeSigner};
use super::{BenchArgs, TempDir, UNTHROTTLED, line, rss_bytes};
use crate::broker::{Broker, TokenRequest, Upstreams};
use crate::clock::SystemClock;

pub const TENANTS: usize = 100;

#[derive(Debug, Clone)]
pub struct MemoryOptions {
    pub sizes: Vec<usize>,
    pub token_bytes: usize,
}

impl From<&BenchArgs> for MemoryOptions {
    fn from(a: &BenchArgs) -> Self {
        let mut sizes: Vec<usize> = a
            .memory_tokens
            .iter()
            .copied()
            .filter(|&n| n > 0 && n <= 1_000_000)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        MemoryOptions {
            sizes,
            token_bytes: a.token_bytes.clamp(16, 64 * 1024),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    pub tokens: usize,
    pub rss_bytes: u64,
    /// RSS above the process before the cache was filled, over the tokens cached.
    pub bytes_per_token: f64,
    pub fill_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub token_bytes: usize,
    pub tenants: usize,
    pub rss_before_bytes: u64,
    pub points: Vec<MemoryPoint>,
}

impl MemoryReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        line(
            &mut out,
            format!(
                "\n== memory: cached tokens of {} bytes over {} tenants; RSS before filling {:.1} MiB ==",
                self.token_bytes,
                self.tenants,
                mib(self.rss_before_bytes)
            ),
        );
        line(&mut out, "tokens      RSS        bytes/token  fill");
        for p in &self.points {
            line(
                &mut out,
                format!(
                    "{:>7} {:>9.1} MiB {:>10.0} B {:>6.2}s",
                    p.tokens,
                    mib(p.rss_bytes),
                    p.bytes_per_token,
                    p.fill_seconds
                ),
            );
        }
        let _ = write!(
            out,
            "targets: < 4096 bytes per cached token; 100k tokens < 400 MiB resident"
        );
        out
    }
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A broker with `tenants` tenants on fake upstreams (fast, in memory).
pub fn fake_broker(tenants: usize, token_bytes: usize) -> anyhow::Result<(Broker, TempDir)> {
    let dir = TempDir::new("memory")?;
    let mut toml = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n\n[cache]\nmax_entries = 2000000\n",
    );
    toml.push_str(UNTHROTTLED);
    for i in 0..tenants {
        let _ = write!(
            toml,
            "\n[tenants.t{i}]\ntenant_id = \"e0e0e0e0-0000-4000-8000-{i:012x}\"\n\
             client_id = \"a0a0a0a0-0000-4000-8000-{i:012x}\"\n\
             credential = {{ type = \"key_vault_certificate\", vault_url = \"https://bench.vault.azure.net\", certificate = \"app-{i}\" }}\n"
        );
    }
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, toml)?;
    let config = crate::config::Config::load(&path, &|_| None)
        .map_err(|e| anyhow::anyhow!("memory bench configuration: {e}"))?;
    let broker = Broker::new(
        &config,
        Upstreams {
            signer: Arc::new(FakeSigner),
            hsm: Arc::new(FakeSigner),
            identity: Arc::new(crate::identity::ManagedIdentityAssertions::new(
                Default::default(),
            )),
            exchange: Arc::new(FakeExchange {
                token_bytes,
                lifetime: Duration::from_secs(3600),
            }),
            clock: Arc::new(SystemClock),
        },
    );
    Ok((broker, dir))
}

/// The request for key number `k`: tenant `k mod TENANTS`, scope `k / TENANTS`.
pub fn key_request(k: usize) -> TokenRequest {
    TokenRequest {
        tenant: format!("t{}", k % TENANTS),
        scopes: vec![format!("api://bench-{}/.default", k / TENANTS)],
        min_validity: None,
        force_refresh: false,
        claims: None,
    }
}

/// Fills keys `from..to`, 256 at a time.
pub async fn fill(broker: &Broker, from: usize, to: usize) -> anyhow::Result<()> {
    let mut results = futures::stream::iter(from..to)
        .map(|k| {
            let b = broker.clone();
            async move { b.get_token(key_request(k)).await }
        })
        .buffer_unordered(256);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

pub async fn run(opts: &MemoryOptions) -> anyhow::Result<MemoryReport> {
    let (broker, _dir) = fake_broker(TENANTS, opts.token_bytes)?;
    // One fetch first, so one-off allocations (runtime, certificate cache) are in the baseline.
    broker.get_token(key_request(usize::MAX / 2)).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss_bytes().unwrap_or(0);
    let mut points = Vec::new();
    let mut filled = 0;
    for &n in &opts.sizes {
        let t = Instant::now();
        fill(&broker, filled, n).await?;
        let fill_seconds = t.elapsed().as_secs_f64();
        filled = n;
        // Let moka's housekeeping and the spawned refresh tasks settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = rss_bytes().unwrap_or(0);
        points.push(MemoryPoint {
            tokens: n,
            rss_bytes: rss,
            bytes_per_token: rss.saturating_sub(before) as f64 / n as f64,
            fill_seconds,
        });
    }
    Ok(MemoryReport {
        token_bytes: opts.token_bytes,
        tenants: TENANTS,
        rss_before_bytes: before,
        points,
    })
}
