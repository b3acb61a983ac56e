//! `tokenbroker bench`: performance measurements on loopback, reported in
//! `docs/PERFORMANCE.md`. Every loop here is bounded in requests and time and talks to
//! 127.0.0.1 only.
//!
//! - `load`: cache-hit `GetToken` against the broker (warm cache, on the embedded emulator)
//!   and against a bare tonic server answering the same RPC with a constant, same-size
//!   response, driven by the same client (connections, concurrent streams, duration or request
//!   count; plaintext, mutual TLS, or bearer JWTs from a loopback issuer (`jwt`)),
//!   alternating rounds; requests/s, p50/p90/p99/p99.9 and the broker/baseline ratios.
//! - `cold`: miss latency with fixed latencies injected by the emulator on Key Vault sign and
//!   the Entra token endpoint; the broker's own overhead.
//! - `economy`: N tenants × M scopes under load with refresh-ahead on a manual clock: Key
//!   Vault signs and Entra exchanges per key per refresh window (emulator counters).
//! - `memory`: resident memory with 1k/10k/100k cached tokens (fake fast upstreams), bytes
//!   per cached token.
//! - `startup`: time from spawning `tokenbroker serve` to gRPC health SERVING.

pub mod cold;
pub mod economy;
pub mod fake;
pub mod jwt;
pub mod load;
pub mod memory;
pub mod startup;
pub mod targets;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::broker::{Broker, Upstreams};
use crate::emulator::{Emulator, EmulatorConfig, Endpoints, StartOptions};

/// The scope every load request asks for.
pub const GRAPH: &str = "https://graph.microsoft.com/.default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    All,
    Load,
    Cold,
    Economy,
    Memory,
    Startup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Plaintext,
    Mtls,
    /// Plaintext and mTLS.
    Both,
    /// Plaintext with a bearer JWT on every request (a Kubernetes service account's, RS256):
    /// the broker authenticates it, the baseline ignores it. Not part of `both`.
    Bearer,
}

/// `tokenbroker bench` options. Defaults are the figures reported in docs/PERFORMANCE.md.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Which measurement to run (`all` runs memory and cold in processes of their own).
    #[arg(value_enum, default_value = "all")]
    pub what: What,
    /// load: HTTP/2 connections from the client to each server.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// load: concurrent requests in flight in total (spread over the connections).
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    /// load: seconds per target per round (a round stops at this or at --requests).
    #[arg(long, default_value_t = 2.0)]
    pub duration: f64,
    /// load: requests per target per round (default: bounded by --duration only).
    #[arg(long)]
    pub requests: Option<u64>,
    /// load: measured rounds; baseline and broker alternate, the order flipping each round.
    /// Many short rounds follow a machine whose speed drifts (shared virtual machines).
    #[arg(long, default_value_t = 8)]
    pub rounds: usize,
    /// load: seconds of unrecorded warm-up per target.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// load: plaintext, mutual TLS, both, or plaintext with bearer tokens.
    #[arg(long, value_enum, default_value = "both")]
    pub transport: Transport,
    /// cold: misses measured (sequentially); p99 is the second slowest of the default 200.
    #[arg(long, default_value_t = 200)]
    pub cold_samples: usize,
    /// cold: latency injected on every Key Vault sign, in ms.
    #[arg(long, default_value_t = 20)]
    pub sign_latency_ms: u64,
    /// cold: latency injected on every Entra token request, in ms.
    #[arg(long, default_value_t = 80)]
    pub exchange_latency_ms: u64,
    /// economy: tenants (each its own app).
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// economy: scopes (resources) per tenant.
    #[arg(long, default_value_t = 3)]
    pub scopes: usize,
    /// economy: refresh windows after the initial fill.
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// economy: concurrent callers hammering the keys throughout.
    #[arg(long, default_value_t = 64)]
    pub economy_concurrency: usize,
    /// memory: cached token counts to measure at (ascending).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub memory_tokens: Vec<usize>,
    /// memory: size of each access token in bytes.
    #[arg(long, default_value_t = 1536)]
    pub token_bytes: usize,
    /// startup: processes started and timed.
    #[arg(long, default_value_t = 10)]
    pub startup_runs: usize,
    /// Also write every result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: BenchArgs,
        }
        P::parse_from(["bench"]).a
    }
}

/// Runs the chosen measurements and prints their reports.
pub async fn run(args: BenchArgs) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The broker is measured as `serve` runs it by default: info-level logging and a span per
    // request with trace context, no trace export.
    let _telemetry = crate::telemetry::init_with(
        crate::config::LogFormat::Human,
        "info",
        &crate::config::TelemetryConfig {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "tokenbroker-bench".into(),
            metrics_interval: Duration::from_secs(60),
            extra_ca_file: None,
        },
    );
    match run_inner(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenbroker bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_inner(args: &BenchArgs) -> anyhow::Result<()> {
    let mut results = serde_json::Map::new();
    println!("{}", machine().text());
    results.insert("machine".into(), serde_json::to_value(machine())?);
    let all = args.what == What::All;
    if all {
        results.insert("memory".into(), in_child(What::Memory, args).await?);
    } else if args.what == What::Memory {
        let r = memory::run(&memory::MemoryOptions::from(args)).await?;
        println!("{}", r.text());
        results.insert("memory".into(), serde_json::to_value(&r)?);
    }
    if all || args.what == What::Startup {
        let r = startup::run(args.startup_runs).await?;
        println!("{}", r.text());
        results.insert("startup".into(), serde_json::to_value(&r)?);
    }
    if all || args.what == What::Load {
        let r = load::run(&load::LoadOptions::from(args)).await?;
        for l in &r {
            println!("{}", l.text());
        }
        results.insert("load".into(), serde_json::to_value(&r)?);
    }
    if all {
        results.insert("cold".into(), in_child(What::Cold, args).await?);
    } else if args.what == What::Cold {
        let r = cold::run(&cold::ColdOptions::from(args)).await?;
        println!("{}", r.text());
        results.insert("cold".into(), serde_json::to_value(&r)?);
    }
    if all || args.what == What::Economy {
        let r = economy::run(&economy::EconomyOptions::from(args)).await?;
        println!("{}", r.text());
        results.insert("economy".into(), serde_json::to_value(&r)?);
    }
    if all {
        let verdicts = targets::judge(&results);
        print!("{}", targets::text(&verdicts));
        results.insert("targets".into(), serde_json::to_value(&verdicts)?);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(results))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One measurement run as `tokenbroker bench <what> <args>` in a child process (this
/// executable), its report printed here and its JSON result returned. A process of its own
/// starts clean: for `memory`, RSS growth is the cache's alone, and the large heap that 100k
/// tokens leave behind (glibc keeps it, fragmented) does not slow the allocator for the
/// measurements that follow; for `cold`, the sequential misses do not inherit the load runs'
/// heap, connections and idle tasks.
async fn in_child(what: What, a: &BenchArgs) -> anyhow::Result<Value> {
    let args = child_args(what, a);
    // Its name on the command line, as clap parses it.
    let what = clap::ValueEnum::to_possible_value(&what)
        .map(|v| v.get_name().to_owned())
        .context("a measurement without a name")?;
    let what = what.as_str();
    let exe = std::env::current_exe()?;
    let dir = TempDir::new(what)?;
    let json = dir.path().join(format!("{what}.json"));
    let out = tokio::process::Command::new(&exe)
        .args(["bench", what])
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {} bench {what}", exe.display()))?;
    anyhow::ensure!(out.status.success(), "bench {what}: {}", out.status);
    // Its report without the machine line printed already.
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.split_once('\n').map_or(&*text, |(_, rest)| rest));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)
        .with_context(|| format!("bench {what}'s JSON"))?;
    Ok(v[what].clone())
}

/// The options of `bench memory` and `bench cold` that `bench all` passes on to its children.
fn child_args(what: What, a: &BenchArgs) -> Vec<String> {
    let pairs: Vec<(&str, String)> = match what {
        What::Memory => {
            let tokens: Vec<String> = a.memory_tokens.iter().map(usize::to_string).collect();
            vec![
                ("--memory-tokens", tokens.join(",")),
                ("--token-bytes", a.token_bytes.to_string()),
            ]
        }
        What::Cold => vec![
            ("--cold-samples", a.cold_samples.to_string()),
            ("--sign-latency-ms", a.sign_latency_ms.to_string()),
            ("--exchange-latency-ms", a.exchange_latency_ms.to_string()),
        ],
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub build: &'static str,
}

pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        build: if cfg!(debug_assertions) {
            "debug (figures are not representative: use --release)"
        } else {
            "release"
        },
    }
}

impl Machine {
    pub fn text(&self) -> String {
        format!(
            "machine: {} CPUs, {}; {} build",
            self.cpus, self.cpu_model, self.build
        )
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Percentiles {
    /// From samples in nanoseconds (sorted here); signed samples are differences, which
    /// may be negative.
    pub fn of<T: Copy + Ord + Into<i128>>(samples: &mut [T]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].into() as f64 / 1000.0
        };
        let sum: i128 = samples.iter().map(|&v| v.into()).sum();
        Percentiles {
            count: samples.len(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
            mean_us: sum as f64 / samples.len() as f64 / 1000.0,
        }
    }

    pub fn row(&self) -> String {
        format!(
            "p50 {:>9} p90 {:>9} p99 {:>9} p99.9 {:>9} max {:>9}",
            us(self.p50_us),
            us(self.p90_us),
            us(self.p99_us),
            us(self.p999_us),
            us(self.max_us)
        )
    }
}

/// A duration in µs, printed in ms past 10 ms.
pub fn us(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.1}ms", v / 1000.0)
    } else {
        format!("{v:.0}µs")
    }
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "tokenbroker-bench-{label}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The emulator's admin API (plain HTTP on loopback).
#[derive(Debug, Clone)]
pub struct Admin {
    http: reqwest::Client,
    url: String,
}

impl Admin {
    pub fn new(url: &str) -> Admin {
        Admin {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "admin {path}: {}", r.status());
        Ok(r.json().await.unwrap_or(Value::Null))
    }

    pub async fn counters(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/counters", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// Signatures made by the emulated Key Vault, over all keys.
pub fn total_signs(counters: &Value) -> u64 {
    counters["sign"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Token requests answered by the emulated Entra, over all tenants and apps.
pub fn total_exchanges(counters: &Value) -> u64 {
    counters["exchanges"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v["total"].as_u64()).sum())
        .unwrap_or(0)
}

/// Where a bench runs the emulator.
#[derive(Debug, Clone)]
pub enum EmulatorAt {
    /// In this process: its work (RSA signing, TLS) shares the broker's runtime threads.
    InProcess(EmulatorConfig),
    /// `EXE emulator` with the demo configuration, in a process of its own, apart from the
    /// broker as Azure is.
    Process(PathBuf),
}

/// The emulator plus a broker configured against it (real managed identity, Key Vault and
/// Entra clients), serving on loopback in this process.
pub struct Stack {
    pub emulator: Option<Emulator>,
    /// The emulator's process, when it runs in one (killed when dropped).
    child: Option<tokio::process::Child>,
    pub addr: SocketAddr,
    pub broker: Broker,
    pub admin: Admin,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    pub dir: TempDir,
}

impl Stack {
    /// `edit` may change the generated dev configuration (given the state directory);
    /// `wrap` may replace the upstreams (timing, counting, a manual clock).
    pub async fn start(
        at: EmulatorAt,
        edit: impl FnOnce(String, &Path) -> anyhow::Result<String>,
        wrap: impl FnOnce(Upstreams) -> Upstreams,
    ) -> anyhow::Result<Stack> {
        let dir = TempDir::new("stack")?;
        let (emu_config, emulator, child, endpoints) = match at {
            EmulatorAt::InProcess(config) => {
                let emulator =
                    Emulator::start(config.clone(), StartOptions::new(dir.path().join("ca.pem")))
                        .await
                        .context("starting the emulator")?;
                let endpoints = emulator.endpoints().clone();
                (config, Some(emulator), None, endpoints)
            }
            EmulatorAt::Process(exe) => {
                let (child, endpoints) = spawn_emulator(&exe, dir.path()).await?;
                (EmulatorConfig::demo(), None, Some(child), endpoints)
            }
        };
        let toml = crate::dev::broker_config_toml(&emu_config, &endpoints, "127.0.0.1:0".parse()?);
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, edit(toml, dir.path())?)?;
        let config = crate::config::Config::load(&path, &|_| None)
            .map_err(|e| anyhow::anyhow!("bench broker configuration: {e}"))?;
        let up = wrap(crate::server::upstreams(&config)?);
        let bound = crate::server::bind(config, up).await?;
        let addr = bound.local_addr()?;
        let broker = bound.broker.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            if let Err(e) = bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
            {
                eprintln!("bench broker stopped: {e}");
            }
        });
        let admin = Admin::new(&endpoints.admin_url);
        Ok(Stack {
            emulator,
            child,
            addr,
            broker,
            admin,
            stop: Some(stop),
            served: Some(served),
            dir,
        })
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.served.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        if let Some(e) = self.emulator.take() {
            e.shutdown().await;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
    }
}

/// Starts `exe emulator` (demo configuration) writing its endpoints into `dir`, and waits
/// (bounded) until it has.
async fn spawn_emulator(
    exe: &Path,
    dir: &Path,
) -> anyhow::Result<(tokio::process::Child, Endpoints)> {
    let file = dir.join("emulator-endpoints.json");
    let mut child = tokio::process::Command::new(exe)
        .arg("emulator")
        .arg("--endpoints-file")
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {} emulator", exe.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Written with a rename once every listener is up: a file that exists is whole.
        if let Ok(text) = std::fs::read_to_string(&file) {
            let endpoints: Endpoints = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", file.display()))?;
            return Ok((child, endpoints));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{} emulator exited before it was ready: {status}",
                exe.display()
            );
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} emulator not ready within 20 s",
            exe.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replaces `from` in a generated configuration, or says the generator changed.
pub fn replace_once(text: &str, from: &str, to: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        text.contains(from),
        "the generated dev configuration no longer contains {from:?}: update src/bench"
    );
    Ok(text.replacen(from, to, 1))
}

/// Resilience settings that never throttle the benchmark itself (budgets far above the
/// request rates measured), appended to a generated configuration.
pub const UNTHROTTLED: &str = "\n[resilience]\nsign_rate_per_vault = 1000000.0\nsign_burst = 1000000\n\
exchange_rate_per_tenant = 1000000.0\nexchange_burst = 1000000\n";

/// A line of a report table.
pub fn line(out: &mut String, s: impl AsRef<str>) {
    let _ = writeln!(out, "{}", s.as_ref());
}

/// Resident set size of this process, in bytes (`VmRSS` of /proc/self/status).
/// A loopback port nobody listens on now, for a child process to bind. Drawn below the
/// kernel's ephemeral range: a port let go of inside it can be handed at once to any socket
/// bound to port 0 (an emulator starting meanwhile), and whoever then connects reaches a
/// stranger instead of the child, or of nobody.
pub fn free_port() -> std::io::Result<SocketAddr> {
    use rand::Rng as _;
    // Linux's default range starts at 32768; elsewhere the file is missing and that stays.
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if first_ephemeral > 10_000 {
        for _ in 0..100 {
            let port = rand::rng().random_range(10_000..first_ephemeral);
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr();
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU time this process has used so far, all threads, user and system
/// (`CLOCK_PROCESS_CPUTIME_ID`: the scheduler's own accounting, to the nanosecond).
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_cpu_time_grows_with_work() {
        let before = super::process_cpu();
        let mut x = 0u64;
        while super::process_cpu() == before {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(super::process_cpu() > before);
    }
}
