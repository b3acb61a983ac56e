//! Stands up the whole flow in-process: the emulator with a given estate, and a broker
//! configured against it (real managed identity, Key Vault and Entra clients), on loopback.
//! Shared by several test binaries, each using a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokenbroker::broker::{Broker, Upstreams};
use tokenbroker::clock::ManualClock;
use tokenbroker::emulator::{Emulator, EmulatorConfig, StartOptions};
use tokenbroker::entra::{EntraError, EntraToken, ExchangeRequest, TokenExchange};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{GetTokenRequest, GetTokenResponse};
use tonic::transport::Channel;

pub const GRAPH: &str = "https://graph.microsoft.com/.default";
pub use tokenbroker::emulator::config::demo;

pub struct Stack {
    pub emulator: Option<Emulator>,
    pub addr: SocketAddr,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
    pub broker: Broker,
    pub assertions: Arc<Mutex<Vec<String>>>,
    pub http: reqwest::Client,
    pub clock: Option<ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Wraps the real exchange and keeps each assertion sent, so tests can verify them.
#[derive(Debug)]
pub struct Recording {
    inner: Arc<dyn TokenExchange>,
    seen: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl TokenExchange for Recording {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        self.seen
            .lock()
            .unwrap()
            .push(req.assertion.expose().to_owned());
        self.inner.exchange(req).await
    }
}

/// The emulator alone, and a broker configuration for it (`edit`ed) in a temporary
/// directory, for tests that build their own broker (or none).
pub async fn emulator_with_config(
    emu_config: EmulatorConfig,
    edit: impl FnOnce(String) -> String,
) -> (Emulator, std::path::PathBuf, tempfile::TempDir) {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::start(
        emu_config.clone(),
        StartOptions::new(dir.path().join("ca.pem")),
    )
    .await
    .unwrap();
    let toml = tokenbroker::dev::broker_config_toml(
        &emu_config,
        emulator.endpoints(),
        "127.0.0.1:0".parse().unwrap(),
    );
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, edit(toml)).unwrap();
    (emulator, path, dir)
}

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(EmulatorConfig::demo(), |t| t).await
    }

    /// `edit` may change the generated broker TOML (to misconfigure a tenant, say).
    pub async fn start_with(
        emu_config: EmulatorConfig,
        edit: impl FnOnce(String) -> String,
    ) -> Stack {
        Stack::start_full(emu_config, edit, None, |e| e).await
    }

    /// With a manual clock (moved by `advance`, together with the emulator's clock) and a
    /// wrapper around the real Entra exchange.
    pub async fn start_full(
        emu_config: EmulatorConfig,
        edit: impl FnOnce(String) -> String,
        clock: Option<ManualClock>,
        wrap: impl FnOnce(Arc<dyn TokenExchange>) -> Arc<dyn TokenExchange>,
    ) -> Stack {
        Stack::start_in(emu_config, edit, clock, wrap, &|_| None).await
    }

    /// With `env` as the broker's environment (its overrides, its identity's variables), in
    /// place of the process's.
    pub async fn start_with_env(
        emu_config: EmulatorConfig,
        edit: impl FnOnce(String) -> String,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Stack {
        Stack::start_in(emu_config, edit, None, |e| e, env).await
    }

    async fn start_in(
        emu_config: EmulatorConfig,
        edit: impl FnOnce(String) -> String,
        clock: Option<ManualClock>,
        wrap: impl FnOnce(Arc<dyn TokenExchange>) -> Arc<dyn TokenExchange>,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Stack {
        let (emulator, path, dir) = emulator_with_config(emu_config, edit).await;
        let config = tokenbroker::config::Config::load(&path, env).unwrap();
        let real = tokenbroker::server::upstreams_with_env(&config, env).unwrap();
        let assertions = Arc::new(Mutex::new(Vec::new()));
        let up = Upstreams {
            exchange: Arc::new(Recording {
                inner: wrap(real.exchange.clone()),
                seen: assertions.clone(),
            }),
            clock: match &clock {
                Some(c) => Arc::new(c.clone()),
                None => real.clock.clone(),
            },
            ..real
        };
        let bound = tokenbroker::server::bind(config, up).await.unwrap();
        let addr = bound.local_addr().unwrap();
        let admin = bound.admin_addr().unwrap();
        let broker = bound.broker.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let http = http_client(Path::new(&emulator.endpoints().ca_cert));
        Stack {
            emulator: Some(emulator),
            addr,
            admin,
            broker,
            assertions,
            http,
            clock,
            stop: Some(stop),
            served: Some(served),
            _dir: dir,
        }
    }

    /// Moves the broker's manual clock and the emulator's clock forward together.
    pub async fn advance(&self, d: std::time::Duration) {
        self.admin_post(
            "/clock/advance",
            serde_json::json!({"seconds": d.as_secs()}),
        )
        .await;
        self.clock
            .as_ref()
            .expect("started with a manual clock")
            .advance(d);
    }

    /// The admin listener's `/metrics` page.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn emulator(&self) -> &Emulator {
        self.emulator.as_ref().unwrap()
    }

    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        TokenBrokerClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub async fn get(&self, tenant: &str, scope: &str) -> Result<GetTokenResponse, tonic::Status> {
        self.ask(tenant, scope, false).await
    }

    /// A token once a transient failure of the key is no longer shared (its hold-off,
    /// `broker::TRANSIENT_HOLD` without a `Retry-After`): asked again while `UNAVAILABLE`,
    /// for at most 15 s, well short of the negative period (30 s) a failure remembered as
    /// the configuration's would last.
    pub async fn get_after_hold_off(&self, tenant: &str, scope: &str) -> GetTokenResponse {
        for _ in 0..150 {
            match self.get(tenant, scope).await {
                Ok(t) => return t,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        panic!("still unavailable after the hold-off");
    }

    /// A fresh token from Entra ID (`force_refresh`), not the cached one.
    pub async fn force_refresh(
        &self,
        tenant: &str,
        scope: &str,
    ) -> Result<GetTokenResponse, tonic::Status> {
        self.ask(tenant, scope, true).await
    }

    async fn ask(
        &self,
        tenant: &str,
        scope: &str,
        force_refresh: bool,
    ) -> Result<GetTokenResponse, tonic::Status> {
        self.client()
            .await
            .get_token(GetTokenRequest {
                tenant: tenant.into(),
                scopes: vec![scope.into()],
                force_refresh,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    fn admin(&self, path: &str) -> String {
        format!("{}{}", self.emulator().endpoints().admin_url, path)
    }

    pub async fn counters(&self) -> Value {
        self.admin_get("/counters").await
    }

    /// The emulator's faults, live and spent, with their hits.
    pub async fn faults(&self) -> Value {
        self.admin_get("/faults").await
    }

    async fn admin_get(&self, path: &str) -> Value {
        self.http
            .get(self.admin(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Requests the emulator answered on `route` (e.g. `keyvault.sign`), successful or not.
    pub async fn route_total(&self, route: &str) -> u64 {
        self.counters().await["routes"][route]["total"]
            .as_u64()
            .unwrap_or(0)
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(self.admin(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "admin {path}: {}", r.status());
        r.json().await.unwrap_or(Value::Null)
    }

    /// An Entra outage: every token request answered 503 until the faults are cleared.
    pub async fn entra_outage(&self) {
        self.admin_post(
            "/faults",
            serde_json::json!({"route": "entra.token", "count": 100000, "fail": {"status": 503}}),
        )
        .await;
    }

    /// Removes every fault from the emulator.
    pub async fn clear_faults(&self) {
        let resp = self
            .http
            .delete(format!("{}/faults", self.emulator().endpoints().admin_url))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
    }

    pub async fn total_signs(&self) -> u64 {
        let c = self.counters().await;
        c["sign"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    }

    /// Token requests Entra answered for `tenant_id/client_id`.
    pub async fn exchanges(&self, tenant_id: &str, client_id: &str) -> u64 {
        let c = self.counters().await;
        c["exchanges"][format!("{tenant_id}/{client_id}")]["total"]
            .as_u64()
            .unwrap_or(0)
    }

    /// A managed identity token for `resource` (as a test client would get one).
    pub async fn mi_token(&self, resource: &str) -> String {
        let e = self.emulator().endpoints();
        let v: Value = self
            .http
            .get(
                url::Url::parse_with_params(
                    &e.identity_endpoint,
                    &[("resource", resource), ("api-version", "2019-08-01")],
                )
                .unwrap(),
            )
            .header("X-IDENTITY-HEADER", &e.identity_header)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    /// The current version of a certificate in the emulated vault, as Key Vault returns it.
    pub async fn certificate_bundle(&self, name: &str) -> Value {
        let token = self.mi_token("https://vault.azure.net").await;
        self.http
            .get(format!(
                "{}/certificates/{name}?api-version=7.4",
                self.emulator().endpoints().key_vault_url
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// DER of the current version of a certificate in the emulated vault.
    pub async fn certificate_der(&self, name: &str) -> Vec<u8> {
        use base64::Engine;
        let v = self.certificate_bundle(name).await;
        base64::engine::general_purpose::STANDARD
            .decode(v["cer"].as_str().unwrap())
            .unwrap()
    }

    /// The emulated Entra's JWKS for a tenant.
    pub async fn jwks(&self, tenant_id: &str) -> jsonwebtoken::jwk::JwkSet {
        self.http
            .get(format!(
                "{}/{tenant_id}/discovery/v2.0/keys",
                self.emulator().endpoints().authority_host
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.served.take() {
            let _ = h.await;
        }
        if let Some(e) = self.emulator.take() {
            e.shutdown().await;
        }
    }
}

pub fn http_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap()
}

/// Decodes the unverified claims of a JWT.
pub fn claims(jwt: &str) -> Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// Polls a condition on real state (counters, exported spans), bounded; never a timing
/// assertion.
pub async fn wait_for<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2000 {
        if cond().await {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("condition not reached");
}

/// A contoso Graph request in the caller's trace (`traceparent` as W3C writes it).
pub fn traced_request(traceparent: &str) -> tonic::Request<GetTokenRequest> {
    let mut req = tonic::Request::new(GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    req
}

/// Sends SIGTERM to a child process and waits for its exit, bounded (the default drain bound
/// is 20 s); panics, after killing it, if it does not exit.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..600 {
        if let Some(code) = child.try_wait().unwrap() {
            return code;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the process did not exit after SIGTERM");
}

/// `tokenbroker dev` as a process of its own with `envs` set, state in `dir`, its log in
/// `dir/stderr.log`; and the address it serves on. Its stdout is read to the end on a thread
/// of its own, as a terminal would.
pub fn spawn_dev(dir: &Path, envs: &[(&str, &str)]) -> (std::process::Child, String) {
    let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let dev = spawn_dev_with(dir, envs, stderr.into());
    (dev.child, dev.addr)
}

/// A `tokenbroker dev` child, its gRPC address and its admin `/metrics` URL.
pub struct Dev {
    pub child: std::process::Child,
    pub addr: String,
    pub metrics: String,
    /// The lines it writes to stdout after its banner, until it exits.
    pub later_stdout: std::thread::JoinHandle<Vec<String>>,
}

/// `tokenbroker dev` with its log (stderr) wherever the caller says; its banner read up to
/// the addresses, the rest of stdout drained.
pub fn spawn_dev_with(dir: &Path, envs: &[(&str, &str)], stderr: std::process::Stdio) -> Dev {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(["dev", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir)
        .env_remove("NO_COLOR")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = lines.next().expect("dev prints its addresses").unwrap();
        if let Some(rest) = line.split("broker on ").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.split("metrics and probes: ").nth(1) {
            metrics = rest.split(',').next().map(str::to_owned);
        }
    }
    // Drained, so a full pipe never blocks it; kept, for tests about what it writes there.
    let later_stdout = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    Dev {
        child,
        addr: addr.unwrap_or_default(),
        metrics: metrics.unwrap_or_default(),
        later_stdout,
    }
}

/// `tokenbroker serve` as deployed, against an emulator on `rt`.
pub struct Served {
    pub child: std::process::Child,
    pub emulator: Emulator,
    pub addr: SocketAddr,
}

/// Starts the emulator and `tokenbroker serve` with the configuration `tokenbroker dev`
/// generates for it, `extra` appended, `envs` set and its log to `stderr`.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    extra: &str,
    envs: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> Served {
    serve_also_trusting(rt, dir, extra, envs, stderr, "")
}

/// `serve`, with the CA certificates `also_trusted` (PEM) added to the bundle the broker's
/// configuration names as its extra CA bundle (the emulator's CA).
pub fn serve_also_trusting(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    extra: &str,
    envs: &[(&str, &str)],
    stderr: std::process::Stdio,
    also_trusted: &str,
) -> Served {
    let emu = EmulatorConfig::demo();
    let emulator = rt
        .block_on(Emulator::start(
            emu.clone(),
            StartOptions::new(dir.join("ca.pem")),
        ))
        .unwrap();
    let bundle = dir.join("ca.pem");
    let pem = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(&bundle, pem + also_trusted).unwrap();
    let addr = free_port();
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        tokenbroker::dev::broker_config_toml(&emu, emulator.endpoints(), addr) + extra,
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Served {
        child,
        emulator,
        addr,
    }
}

/// A port on loopback nobody listens on, outside the range other tests' listeners get
/// theirs from (`bench::free_port`).
pub fn free_port() -> SocketAddr {
    tokenbroker::bench::free_port().unwrap()
}

/// A plaintext client of the broker at `addr`, once it listens (waited for, bounded).
pub async fn client_when_listening(addr: SocketAddr) -> TokenBrokerClient<Channel> {
    for _ in 0..200 {
        if let Ok(client) = TokenBrokerClient::connect(format!("http://{addr}")).await {
            return client;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the broker at {addr} does not listen");
}

/// An emulator fault's `fail`: Entra refusing the app for good (AADSTS700016, no such app
/// in the tenant: no administrator consented), as a remembered configuration failure.
pub fn app_not_found() -> Value {
    serde_json::json!({"status": 400, "body": {
        "error": "unauthorized_client",
        "error_description": "AADSTS700016: Application with identifier 'x' was not found in the directory.",
        "error_codes": [700016]
    }})
}
