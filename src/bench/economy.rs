//! Upstream economy: N tenants × M scopes, every key asked for continuously by concurrent
//! gRPC callers while the broker's manual clock and the emulator's clock move forward one
//! refresh window at a time. The emulator counts the Key Vault signs and Entra exchanges; the
//! ideal is exactly one of each per key per window (and per key for the initial fill).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use super::fake::TimedExchange;
use super::{Admin, BenchArgs, EmulatorAt, Stack, UNTHROTTLED, line, total_exchanges, total_signs};
use crate::broker::Upstreams;
use crate::clock::ManualClock;
use crate::emulator::EmulatorConfig;
use crate::emulator::config::{AppConfig, CertificateConfig, TenantConfig};
use crate::proto;
use crate::proto::token_broker_client::TokenBrokerClient;

/// Token lifetime in the bench estate, and the refresh fraction: one window is
/// `LIFETIME × FRACTION`, by when every key is due (refresh at the fraction less ≤10% jitter).
const LIFETIME_SECS: u64 = 3600;
const FRACTION: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct EconomyOptions {
    pub tenants: usize,
    pub scopes: usize,
    pub windows: usize,
    pub concurrency: usize,
}

impl From<&BenchArgs> for EconomyOptions {
    fn from(a: &BenchArgs) -> Self {
        EconomyOptions {
            tenants: a.tenants.clamp(1, 200),
            scopes: a.scopes.clamp(1, 20),
            windows: a.windows.clamp(1, 20),
            concurrency: a.economy_concurrency.clamp(1, 1024),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// 0 is the initial fill (every key a miss at once), then one per refresh window.
    pub window: usize,
    pub signs: u64,
    pub exchanges: u64,
    pub signs_per_key: f64,
    pub exchanges_per_key: f64,
    /// Most exchanges any one key saw in the window (broker-side count).
    pub max_exchanges_one_key: u64,
    pub requests_served: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EconomyReport {
    pub tenants: usize,
    pub scopes: usize,
    pub keys: usize,
    pub concurrency: usize,
    pub window_secs: u64,
    pub windows: Vec<Window>,
    pub errors: u64,
    /// Over the refresh windows (not the fill): signs / (keys × windows). Ideal 1.0.
    pub signs_ratio: f64,
    pub exchanges_ratio: f64,
}

impl EconomyReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        line(
            &mut out,
            format!(
                "\n== upstream economy: {} tenants × {} scopes = {} keys, {} concurrent callers, window {} s ==",
                self.tenants, self.scopes, self.keys, self.concurrency, self.window_secs
            ),
        );
        line(
            &mut out,
            "window  signs  exchanges  signs/key  exchanges/key  max/key  requests",
        );
        for w in &self.windows {
            line(
                &mut out,
                format!(
                    "{:>6} {:>6} {:>10} {:>10.3} {:>14.3} {:>8} {:>9}",
                    if w.window == 0 {
                        "fill".to_string()
                    } else {
                        w.window.to_string()
                    },
                    w.signs,
                    w.exchanges,
                    w.signs_per_key,
                    w.exchanges_per_key,
                    w.max_exchanges_one_key,
                    w.requests_served
                ),
            );
        }
        line(
            &mut out,
            format!(
                "per key per refresh window: {:.3} signs, {:.3} exchanges (ideal 1.0 each); {} failed requests",
                self.signs_ratio, self.exchanges_ratio, self.errors
            ),
        );
        out
    }
}

fn guid(prefix: &str, i: usize) -> String {
    format!("{prefix}-0000-4000-8000-{i:012x}")
}

/// The demo estate's identities and vault, with one shared certificate and N tenants, each
/// with its own app and M resources, tokens living exactly `LIFETIME_SECS`.
pub fn estate(tenants: usize, scopes: usize) -> EmulatorConfig {
    let mut emu = EmulatorConfig::demo();
    emu.vaults[0].certificates = vec![CertificateConfig {
        name: "bench-app".into(),
        key_type: "RSA".into(),
        key_size: 2048,
        versions: 1,
        import_pem: None,
        subject: None,
        validity_days: 365,
    }];
    let vault = emu.vaults[0].name.clone();
    emu.tenants = (0..tenants)
        .map(|i| TenantConfig {
            tenant_id: guid("e0e0e0e0", i),
            domain: Some(format!("t{i}.example.com")),
            resources: (0..scopes).map(|j| format!("api://bench-r{j}")).collect(),
            apis: vec![],
            apps: vec![AppConfig {
                client_id: guid("a0a0a0a0", i),
                display_name: Some(format!("bench app {i}")),
                certificates: vec![format!("{vault}/bench-app")],
                roles: vec![],
                enabled: true,
                federated_credentials: vec![],
                token_lifetime_secs: [LIFETIME_SECS, LIFETIME_SECS],
                cae_token_lifetime_secs: None,
                service_principal_id: None,
            }],
            graph_records: 0,
        })
        .collect();
    emu
}

pub async fn run(opts: &EconomyOptions) -> anyhow::Result<EconomyReport> {
    let clock = ManualClock::new();
    let per_key: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let (c, pk) = (clock.clone(), per_key.clone());
    let stack = Stack::start(
        EmulatorAt::InProcess(estate(opts.tenants, opts.scopes)),
        |dev, _| {
            Ok(format!(
                "{dev}\n[cache]\nrefresh_fraction = {FRACTION}\n{UNTHROTTLED}"
            ))
        },
        move |u| Upstreams {
            exchange: Arc::new(TimedExchange {
                inner: u.exchange,
                calls: Default::default(),
                per_key: pk,
            }),
            clock: Arc::new(c),
            signer: u.signer,
            hsm: u.hsm,
            identity: u.identity,
        },
    )
    .await?;
    let result = measure(opts, &stack, &clock, &per_key).await;
    stack.stop().await;
    result
}

async fn measure(
    opts: &EconomyOptions,
    stack: &Stack,
    clock: &ManualClock,
    per_key: &Mutex<HashMap<String, u64>>,
) -> anyhow::Result<EconomyReport> {
    let keys: Vec<(String, String)> = (0..opts.tenants)
        .flat_map(|i| {
            (0..opts.scopes).map(move |j| (format!("t{i}"), format!("api://bench-r{j}/.default")))
        })
        .collect();
    let n = keys.len() as u64;
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr))?
                .timeout(Duration::from_secs(30))
                .connect()
                .await?,
        );
    }
    let before = stack.admin.counters().await?;
    let mut tasks = Vec::new();
    for w in 0..opts.concurrency {
        let mut client = TokenBrokerClient::new(clients[w % clients.len()].clone());
        let (keys, stop, served, errors) =
            (keys.clone(), stop.clone(), served.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            // Bounded: stops when told, and in any case after 10 minutes.
            let bound = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < bound {
                let (tenant, scope) = &keys[i % keys.len()];
                i = i.wrapping_add(7919);
                let r = client
                    .get_token(proto::GetTokenRequest {
                        tenant: tenant.clone(),
                        scopes: vec![scope.clone()],
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let window_secs = (LIFETIME_SECS as f64 * FRACTION) as u64;
    let mut windows = Vec::new();
    let mut last = before;
    let mut last_served = 0;
    let outcome = async {
        for w in 0..=opts.windows {
            if w > 0 {
                let d = Duration::from_secs(window_secs);
                stack
                    .admin
                    .post(
                        "/clock/advance",
                        serde_json::json!({"seconds": d.as_secs()}),
                    )
                    .await?;
                clock.advance(d);
            }
            per_key.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let target = total_exchanges(&last) + n;
            wait_for_exchanges(&stack.admin, target)
                .await
                .with_context(|| format!("window {w}: waiting for every key's exchange"))?;
            // Keep the load on a little longer: a duplicate would show up now.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = stack.admin.counters().await?;
            let signs = total_signs(&now) - total_signs(&last);
            let exchanges = total_exchanges(&now) - total_exchanges(&last);
            let s = served.load(Ordering::Relaxed);
            windows.push(Window {
                window: w,
                signs,
                exchanges,
                signs_per_key: signs as f64 / n as f64,
                exchanges_per_key: exchanges as f64 / n as f64,
                max_exchanges_one_key: per_key
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .copied()
                    .max()
                    .unwrap_or(0),
                requests_served: s - last_served,
            });
            last_served = s;
            last = now;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    outcome?;
    let refresh: Vec<&Window> = windows.iter().filter(|w| w.window > 0).collect();
    let denom = (n * refresh.len() as u64).max(1) as f64;
    Ok(EconomyReport {
        tenants: opts.tenants,
        scopes: opts.scopes,
        keys: n as usize,
        concurrency: opts.concurrency,
        window_secs,
        signs_ratio: refresh.iter().map(|w| w.signs).sum::<u64>() as f64 / denom,
        exchanges_ratio: refresh.iter().map(|w| w.exchanges).sum::<u64>() as f64 / denom,
        errors: errors.load(Ordering::Relaxed),
        windows,
    })
}

/// Waits (bounded) until the emulator has answered at least `target` token requests in all.
async fn wait_for_exchanges(admin: &Admin, target: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c: Value = admin.counters().await?;
        if total_exchanges(&c) >= target {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {target} exchanges after 60 s",
            total_exchanges(&c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
