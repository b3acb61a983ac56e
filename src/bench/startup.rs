//! Start-up: time from spawning `tokenbroker serve --config FILE` (this same executable,
//! configured against an embedded emulator, no pre-warm) until gRPC health reports the
//! `tokenbroker.v1.TokenBroker` service SERVING. Each process is bounded to 10 s and killed
//! (by its own handle) afterwards.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{Percentiles, TempDir, line, us};
use crate::emulator::{Emulator, EmulatorConfig, StartOptions};

const SERVICE: &str = "tokenbroker.v1.TokenBroker";
const BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub runs: usize,
    pub command: String,
    /// Spawn to SERVING.
    pub ready: Percentiles,
    pub min_us: f64,
}

impl StartupReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        line(
            &mut out,
            format!(
                "\n== start-up: spawn to gRPC health SERVING, {} runs of `{}` ==",
                self.runs, self.command
            ),
        );
        line(
            &mut out,
            format!(
                "min {}  median {}  max {}  (target < 200ms)",
                us(self.min_us),
                us(self.ready.p50_us),
                us(self.ready.max_us)
            ),
        );
        out
    }
}

pub async fn run(runs: usize) -> anyhow::Result<StartupReport> {
    let exe = std::env::current_exe()?;
    let dir = TempDir::new("startup")?;
    let emu_config = EmulatorConfig::demo();
    let emulator = Emulator::start(
        emu_config.clone(),
        StartOptions::new(dir.path().join("ca.pem")),
    )
    .await?;
    let result = async {
        let mut samples = Vec::new();
        let mut min = u64::MAX;
        for _ in 0..runs.max(1) {
            let addr = super::free_port()?;
            let toml = crate::dev::broker_config_toml(&emu_config, emulator.endpoints(), addr);
            let path = dir.path().join("broker.toml");
            std::fs::write(&path, toml)?;
            let t = Instant::now();
            let mut child = tokio::process::Command::new(&exe)
                .arg("serve")
                .arg("--config")
                .arg(&path)
                .env("TOKENBROKER_LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {}", exe.display()))?;
            let ready = wait_serving(addr, t).await;
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let ns = ready?.as_nanos() as u64;
            min = min.min(ns);
            samples.push(ns);
        }
        Ok::<_, anyhow::Error>((samples, min))
    }
    .await;
    emulator.shutdown().await;
    let (mut samples, min) = result?;
    Ok(StartupReport {
        runs: samples.len(),
        command: format!("{} serve --config broker.toml", exe.display()),
        ready: Percentiles::of(&mut samples),
        min_us: min as f64 / 1000.0,
    })
}

/// Polls health every millisecond until SERVING, within `BOUND` of `since`.
async fn wait_serving(addr: SocketAddr, since: Instant) -> anyhow::Result<Duration> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(200))
        .timeout(Duration::from_millis(500));
    loop {
        anyhow::ensure!(
            since.elapsed() < BOUND,
            "not SERVING within {BOUND:?} on {addr}"
        );
        if let Ok(ch) = endpoint.connect().await {
            let mut h = HealthClient::new(ch);
            loop {
                match h
                    .check(HealthCheckRequest {
                        service: SERVICE.into(),
                    })
                    .await
                {
                    Ok(r) if r.get_ref().status == 1 => return Ok(since.elapsed()),
                    Ok(_) => {}
                    Err(_) => break,
                }
                anyhow::ensure!(since.elapsed() < BOUND, "not SERVING within {BOUND:?}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
