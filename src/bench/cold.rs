//! Cold path: misses (forced refreshes, so each request runs the whole credential flow:
//! assertion, Key Vault sign, Entra exchange) with fixed latencies injected by the emulator,
//! measured sequentially from a gRPC client. The broker's own overhead is the miss latency
//! less the time spent inside the upstream calls (measured around the `Signer` and
//! `TokenExchange` seams); the naive figure (miss latency less the injected latency) also
//! contains the emulator's own work (RSA signing, issuing the JWT) and loopback HTTPS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use super::fake::{Calls, TimedExchange, TimedSigner, Upstream};
use super::{BenchArgs, EmulatorAt, GRAPH, Percentiles, Stack, UNTHROTTLED, line, us};
use crate::broker::Upstreams;
use crate::emulator::EmulatorConfig;
use crate::proto;
use crate::proto::token_broker_client::TokenBrokerClient;

#[derive(Debug, Clone)]
pub struct ColdOptions {
    pub samples: usize,
    pub sign_latency_ms: u64,
    pub exchange_latency_ms: u64,
    /// The `tokenbroker` executable to run the emulator in a process of its own (as Azure
    /// is: its RSA signing and TLS then do not run on the broker's threads); `None` runs it
    /// in this process.
    pub emulator_exe: Option<std::path::PathBuf>,
}

impl From<&BenchArgs> for ColdOptions {
    fn from(a: &BenchArgs) -> Self {
        ColdOptions {
            samples: a.cold_samples.clamp(1, 10_000),
            sign_latency_ms: a.sign_latency_ms.min(10_000),
            exchange_latency_ms: a.exchange_latency_ms.min(10_000),
            emulator_exe: std::env::current_exe().ok(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ColdReport {
    pub samples: usize,
    /// Where the emulator ran: `separate process` or `process` (this one).
    pub emulator: &'static str,
    pub injected_ms: u64,
    /// Misses that were not answered by a fresh exchange (should be 0).
    pub not_exchanged: usize,
    pub errors: usize,
    /// Miss latency as the gRPC client sees it.
    pub miss: Percentiles,
    /// Miss latency less the injected latency (includes the emulator's own work).
    pub miss_minus_injected: Percentiles,
    /// Time inside the upstream calls less the injected latency: the emulator and loopback
    /// HTTPS, not the broker.
    pub upstream_minus_injected: Percentiles,
    /// Miss latency less the time inside upstream calls: the broker's own overhead
    /// (gRPC, admission, cache, flight, assertion building, response). Target: p99 < 1 ms.
    pub broker_overhead: Percentiles,
    /// A `GetToken` round trip to the bare baseline server, timed the same way (sequential,
    /// after the same pause): what any gRPC call costs on this machine.
    pub bare_round_trip: Percentiles,
    /// Per sample, the broker's own overhead less the bare round trip just before it.
    pub overhead_beyond_round_trip: Percentiles,
    /// The broker's own overhead in three parts. From the client sending the request to the
    /// Key Vault sign starting: delivery, admission, starting the flight, the assertion.
    pub before_sign: Percentiles,
    /// From the sign returning to the Entra exchange starting: the signed assertion.
    pub between_calls: Percentiles,
    /// From the exchange returning to the client holding the answer: caching the token,
    /// waking the request, audit, the response and its delivery.
    pub after_exchange: Percentiles,
    /// CPU time this process used during a miss, all threads: the client, the broker, its
    /// HTTPS calls to the emulator (and, with the emulator in this process, the emulator).
    /// Set against the broker's own overhead, it tells working from waiting (for a thread to
    /// wake, for a core).
    pub miss_cpu: Percentiles,
    /// The same during a bare gRPC round trip.
    pub bare_round_trip_cpu: Percentiles,
}

impl ColdReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        line(
            &mut out,
            format!(
                "\n== cold path: {} sequential misses, {} ms injected per miss, emulator in {} ({} not exchanged, {} errors) ==",
                self.samples, self.injected_ms, self.emulator, self.not_exchanged, self.errors
            ),
        );
        for (name, p) in [
            ("miss latency", &self.miss),
            ("miss − injected", &self.miss_minus_injected),
            ("upstream − injected", &self.upstream_minus_injected),
            ("broker's own", &self.broker_overhead),
            ("bare gRPC round trip", &self.bare_round_trip),
            ("own − round trip", &self.overhead_beyond_round_trip),
            ("own: before sign", &self.before_sign),
            ("own: between calls", &self.between_calls),
            ("own: after exchange", &self.after_exchange),
            ("CPU per miss", &self.miss_cpu),
            ("CPU per round trip", &self.bare_round_trip_cpu),
        ] {
            line(&mut out, format!("{name:<20} {}", p.row()));
        }
        line(
            &mut out,
            format!(
                "broker's own overhead p99 {} (target < 1ms); beyond a bare gRPC round trip p99 {}",
                us(self.broker_overhead.p99_us),
                us(self.overhead_beyond_round_trip.p99_us)
            ),
        );
        out
    }
}

pub async fn run(opts: &ColdOptions) -> anyhow::Result<ColdReport> {
    let calls = Arc::new(Calls::default());
    let c = calls.clone();
    let (at, emulator) = match &opts.emulator_exe {
        Some(exe) => (EmulatorAt::Process(exe.clone()), "separate process"),
        None => (EmulatorAt::InProcess(EmulatorConfig::demo()), "process"),
    };
    let stack = Stack::start(
        at,
        |dev, _| {
            Ok(format!(
                "{dev}\n[cache]\nforce_refresh_interval_secs = 0\n{UNTHROTTLED}"
            ))
        },
        move |u| Upstreams {
            identity: u.identity,
            signer: Arc::new(TimedSigner {
                inner: u.signer,
                calls: c.clone(),
            }),
            exchange: Arc::new(TimedExchange {
                inner: u.exchange,
                calls: c,
                per_key: Default::default(),
            }),
            clock: u.clock,
            hsm: u.hsm,
        },
    )
    .await?;
    let result = async {
        let mut client = TokenBrokerClient::connect(format!("http://{}", stack.addr)).await?;
        let req = |force_refresh| proto::GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            force_refresh,
            ..Default::default()
        };
        // Warm: managed identity token, certificate metadata, connections to the emulator.
        let mut warm = None;
        for _ in 0..3 {
            warm = Some(
                client
                    .get_token(req(true))
                    .await
                    .context("warm-up request")?
                    .into_inner(),
            );
        }
        let bare = super::load::BareServer::start(warm.unwrap_or_default(), None).await?;
        let mut bare_client = TokenBrokerClient::connect(format!("http://{}", bare.addr)).await?;
        bare_client.get_token(req(false)).await?;
        let injected = opts.sign_latency_ms + opts.exchange_latency_ms;
        let count = opts.samples + 10;
        for (route, latency_ms) in [
            ("keyvault.sign", opts.sign_latency_ms),
            ("entra.token", opts.exchange_latency_ms),
        ] {
            if latency_ms > 0 {
                stack
                    .admin
                    .post(
                        "/faults",
                        json!({"route": route, "latency_ms": latency_ms, "count": count}),
                    )
                    .await?;
            }
        }
        let injected_ns = injected as i64 * 1_000_000;
        let (mut miss, mut naive, mut upstream, mut own) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut rtt, mut beyond) = (Vec::new(), Vec::new());
        let (mut before_sign, mut between, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let ns = |d: Duration| d.as_nanos() as i64;
        let (mut miss_cpu, mut rtt_cpu) = (Vec::new(), Vec::new());
        let cpu_ns = |since: Duration| ns(super::process_cpu().saturating_sub(since)) as u64;
        let (mut not_exchanged, mut errors) = (0, 0);
        for _ in 0..opts.samples {
            let cpu = super::process_cpu();
            let t = Instant::now();
            let bare_ok = bare_client.get_token(req(false)).await.is_ok();
            let round_trip = ns(t.elapsed());
            let round_trip_cpu = cpu_ns(cpu);
            // The same pause before each call, so both start from the same idle state.
            tokio::time::sleep(Duration::from_millis(2)).await;
            calls.take();
            let cpu = super::process_cpu();
            let t = Instant::now();
            let r = client.get_token(req(true)).await;
            let done = Instant::now();
            let cpu = cpu_ns(cpu);
            let e2e = ns(done - t);
            let made = calls.take();
            let up: i64 = made.iter().map(|c| ns(c.took())).sum();
            if let [sign, exchange] = made.as_slice()
                && sign.upstream == Upstream::Sign
                && exchange.upstream == Upstream::Exchange
            {
                before_sign.push(ns(sign.start.saturating_duration_since(t)));
                between.push(ns(exchange.start.saturating_duration_since(sign.end)));
                after.push(ns(done.saturating_duration_since(exchange.end)));
            }
            match r {
                Ok(r) if r.get_ref().source == proto::TokenSource::Exchange as i32 => {
                    miss.push(e2e as u64);
                    naive.push(e2e - injected_ns);
                    upstream.push(up - injected_ns);
                    own.push(e2e - up);
                    miss_cpu.push(cpu);
                    if bare_ok {
                        rtt.push(round_trip as u64);
                        rtt_cpu.push(round_trip_cpu);
                        beyond.push(e2e - up - round_trip);
                    }
                }
                Ok(_) => not_exchanged += 1,
                Err(_) => errors += 1,
            }
            // Let the refresh scheduled by this fetch settle before the next miss.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, anyhow::Error>(ColdReport {
            samples: opts.samples,
            emulator,
            injected_ms: injected,
            not_exchanged,
            errors,
            miss: Percentiles::of(&mut miss),
            miss_minus_injected: Percentiles::of(&mut naive),
            upstream_minus_injected: Percentiles::of(&mut upstream),
            broker_overhead: Percentiles::of(&mut own),
            bare_round_trip: Percentiles::of(&mut rtt),
            overhead_beyond_round_trip: Percentiles::of(&mut beyond),
            before_sign: Percentiles::of(&mut before_sign),
            between_calls: Percentiles::of(&mut between),
            after_exchange: Percentiles::of(&mut after),
            miss_cpu: Percentiles::of(&mut miss_cpu),
            bare_round_trip_cpu: Percentiles::of(&mut rtt_cpu),
        })
        .map(|r| (r, bare))
    }
    .await;
    let result = match result {
        Ok((r, bare)) => {
            bare.stop().await;
            Ok(r)
        }
        Err(e) => Err(e),
    };
    stack.stop().await;
    result
}
