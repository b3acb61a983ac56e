//! The emulator plus a broker serving TLS with optional or required client certificates,
//! bearer-token issuers (the test issuer and the emulated Entra), a policy file, limits, and
//! an in-memory audit sink.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokenbroker::access::Access;
use tokenbroker::audit::{AuditRecord, MemorySink};
use tokenbroker::emulator::{Emulator, EmulatorConfig, StartOptions};
use tokenbroker::proto::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::{GetTokenRequest, GetTokenResponse};
use tokenbroker::tls::{ListenerConfig, ReloadingCert};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::issuer::{AUDIENCE, TestIssuer};
use crate::pki::{Ca, Leaf};

pub const GRAPH: &str = "https://graph.microsoft.com/.default";
pub const CONTOSO_API: &str = "api://contoso-api/.default";
pub use tokenbroker::emulator::config::demo;

pub struct Options {
    pub client_cert: &'static str,
    pub policy: String,
    pub limits: &'static str,
    /// Lines added to `[callers]`.
    pub callers: &'static str,
    /// Lines added to `[server]`.
    pub server: &'static str,
    /// Configure `client_crl_files = ["callers.crl"]`, starting with a list that revokes
    /// nothing.
    pub crl: bool,
    /// Configure `client_ca_file = "callers-ca.pem"`, the harness's CA (`Harness::ca`).
    pub client_ca_file: bool,
    /// Files written into the broker's directory before it starts: (name, content).
    pub files: Vec<(&'static str, String)>,
    /// Files written into the broker's directory after its configuration is loaded (and
    /// checked) and before the broker is built from it: (name, content).
    pub replaced_before_bind: Vec<(&'static str, String)>,
    /// More trusted issuers, `[callers.issuers.NAME]` with their `issuer` URL.
    pub issuers: Vec<(&'static str, String)>,
    /// Draws each connection's maximum age from the configured one, instead of the broker's
    /// jitter (`Bound::with_connection_age`).
    pub connection_age: Option<ConnectionAge>,
    /// Replaces how long the broker bears a silent connection (`Bound::with_silence`).
    pub silence: Option<tokenbroker::server::Silence>,
}

pub type ConnectionAge = Arc<dyn Fn(std::time::Duration) -> std::time::Duration + Send + Sync>;

impl Default for Options {
    fn default() -> Self {
        Options {
            client_cert: "optional",
            policy: String::new(),
            limits: "",
            callers: "",
            server: "",
            crl: false,
            client_ca_file: true,
            files: Vec::new(),
            replaced_before_bind: Vec::new(),
            issuers: Vec::new(),
            connection_age: None,
            silence: None,
        }
    }
}

pub struct Harness {
    pub emulator: Option<Emulator>,
    pub addr: SocketAddr,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
    pub ca: Ca,
    pub audit: Arc<MemorySink>,
    pub access: Arc<Access>,
    /// The broker itself, for what a test does behind the API's back.
    pub broker: tokenbroker::broker::Broker,
    pub server_cert: Arc<ReloadingCert>,
    pub listener_tls: Arc<ListenerConfig>,
    pub issuer: TestIssuer,
    pub dir: tempfile::TempDir,
    pub server_ca_pem: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl Harness {
    pub async fn start(opts: Options) -> Harness {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let emu_config = EmulatorConfig::demo();
        let emulator = Emulator::start(
            emu_config.clone(),
            StartOptions::new(dir.path().join("ca.pem")),
        )
        .await
        .unwrap();
        let issuer = TestIssuer::start().await;
        let ca = Ca::new("callers and server CA");
        std::fs::write(dir.path().join("callers-ca.pem"), ca.pem()).unwrap();
        ca.server().write(dir.path(), "server");
        for (name, content) in &opts.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let client_ca = if opts.client_ca_file {
            "client_ca_file = \"callers-ca.pem\"\n"
        } else {
            ""
        };
        let crl = if opts.crl {
            std::fs::write(dir.path().join("callers.crl"), ca.crl(1, &[])).unwrap();
            "client_crl_files = [\"callers.crl\"]\n"
        } else {
            ""
        };
        let dev = tokenbroker::dev::broker_config_toml(
            &emu_config,
            emulator.endpoints(),
            "127.0.0.1:0".parse().unwrap(),
        );
        // Everything the dev config says about upstreams and tenants, none of its dev access.
        let upstreams = &dev[dev.find("[identity]").unwrap()..];
        let (before, after) = upstreams.split_once("# Dev only: requests").unwrap();
        let end = "max_in_flight_per_caller = 4096";
        let after = &after[after.find(end).unwrap() + end.len()..];
        // No grants is said with a comment: an empty file is refused as one being written.
        let policy = if opts.policy.is_empty() {
            "# no grants\n"
        } else {
            &opts.policy
        };
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
        let contoso_issuer = format!(
            "{}/{}/v2.0",
            emulator.endpoints().authority_host,
            demo::CONTOSO_TENANT
        );
        let issuers: String = opts
            .issuers
            .iter()
            .map(|(name, url)| format!("[callers.issuers.{name}]\nissuer = \"{url}\"\n\n"))
            .collect();
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert_file = \"server.crt\"\ntls_key_file = \"server.key\"\n\
             {client_ca}{crl}client_cert = \"{}\"\n{}\n\n{before}{after}\n\
             [callers]\naudience = \"{AUDIENCE}\"\n{}\n\n\
             [callers.issuers.test]\nissuer = \"{}\"\n\n\
             [callers.issuers.contoso-entra]\nissuer = \"{contoso_issuer}\"\naudience = \"{}\"\n\
             identity_claim = \"azp\"\nalgorithms = [\"RS256\"]\n\n{issuers}\
             [policy]\nfile = \"policy.toml\"\n\n[limits]\n{}\n",
            opts.client_cert,
            opts.server,
            opts.callers,
            issuer.url(),
            demo::CONTOSO_API,
            opts.limits,
        );
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, &toml).unwrap();
        let config = tokenbroker::config::Config::load(&path, &|_| None)
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        for (name, content) in &opts.replaced_before_bind {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let up = tokenbroker::server::upstreams(&config).unwrap();
        let audit = Arc::new(MemorySink::default());
        let http = tokenbroker::outbound::http_client(&config.outbound).unwrap();
        let access = Access::with_sink(&config, http, audit.clone()).unwrap();
        let mut bound = tokenbroker::server::bind_with(config, up, access)
            .await
            .unwrap();
        if let Some(draw) = opts.connection_age {
            bound = bound.with_connection_age(move |age| draw(age));
        }
        if let Some(silence) = opts.silence {
            bound = bound.with_silence(silence);
        }
        let addr = bound.local_addr().unwrap();
        let admin = bound.admin_addr().unwrap();
        let access = bound.access().clone();
        let broker = bound.broker.clone();
        let server_cert = bound.server_cert().unwrap().clone();
        let listener_tls = bound.listener_tls().unwrap().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let server_ca_pem = ca.pem();
        Harness {
            emulator: Some(emulator),
            addr,
            admin,
            ca,
            audit,
            access,
            broker,
            server_cert,
            listener_tls,
            issuer,
            dir,
            server_ca_pem,
            stop: Some(stop),
            served: Some(served),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
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

    /// The values of the unlabelled series `names` in the broker's /metrics, in that order.
    pub async fn metric_values<const N: usize>(&self, names: [&str; N]) -> [u64; N] {
        let text = self.metrics().await;
        names.map(|name| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap()
        })
    }

    /// Replaces the policy file and reloads it.
    pub fn set_policy(&self, text: &str) -> Result<bool, tokenbroker::policy::PolicyError> {
        std::fs::write(self.path("policy.toml"), text).unwrap();
        self.access.policy().reload()
    }

    pub fn endpoint(&self, client: Option<&Leaf>) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server_ca_pem))
            .domain_name("localhost");
        if let Some(c) = client {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    }

    pub async fn client(
        &self,
        cert: Option<&Leaf>,
    ) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
        Ok(TokenBrokerClient::new(self.endpoint(cert).connect().await?))
    }

    /// GetToken with an optional client certificate and bearer token.
    pub async fn get(
        &self,
        cert: Option<&Leaf>,
        bearer: Option<&str>,
        tenant: &str,
        scopes: &[&str],
    ) -> Result<GetTokenResponse, tonic::Status> {
        let mut client = self
            .client(cert)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
        let mut req = tonic::Request::new(GetTokenRequest {
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        if let Some(b) = bearer {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        client.get_token(req).await.map(|r| r.into_inner())
    }

    fn emulator_admin(&self) -> (reqwest::Client, String) {
        let ca = std::fs::read(self.path("ca.pem")).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
            .build()
            .unwrap();
        let url = format!(
            "{}/faults",
            self.emulator.as_ref().unwrap().endpoints().admin_url
        );
        (http, url)
    }

    /// Adds an emulator fault (docs/EMULATOR.md).
    pub async fn fault(&self, spec: serde_json::Value) {
        let (http, url) = self.emulator_admin();
        let r = http.post(url).json(&spec).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }

    /// Emulator faults not yet spent (a fault is spent as the request reaches it, before
    /// any latency it adds).
    pub async fn faults_left(&self) -> usize {
        let (http, url) = self.emulator_admin();
        let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        // Spent faults stay listed, marked `spent`.
        v["faults"]
            .as_array()
            .expect("a list of faults")
            .iter()
            .filter(|f| f["spent"] != true)
            .count()
    }

    /// Waits (bounded, 10 s) until every emulator fault is spent: the requests they hold
    /// have reached the emulator.
    pub async fn until_faults_spent(&self, what: &str) {
        for _ in 0..400 {
            if self.faults_left().await == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("{what}: emulator faults still unspent");
    }

    /// A GetToken of `tenant`'s Graph token by the caller with the client certificate
    /// `leaf`, on a connection of its own, in a task (to be held by an emulator fault).
    pub async fn spawn_get(
        &self,
        leaf: &Leaf,
        tenant: &str,
    ) -> tokio::task::JoinHandle<
        Result<tonic::Response<tokenbroker::proto::GetTokenResponse>, tonic::Status>,
    > {
        let mut client = self.client(Some(leaf)).await.unwrap();
        let tenant = tenant.to_owned();
        tokio::spawn(async move {
            client
                .get_token(tokenbroker::proto::GetTokenRequest {
                    tenant,
                    scopes: vec![GRAPH.into()],
                    ..Default::default()
                })
                .await
        })
    }

    pub fn records(&self) -> Vec<AuditRecord> {
        self.audit.records()
    }

    /// Stops the server, which writes the summaries of repeated refusals it still holds,
    /// and returns every record.
    /// The records are those written when serving has returned, as the process exits then.
    pub async fn stop_and_records(mut self) -> Vec<AuditRecord> {
        self.stop_serving().await;
        let records = self.audit.records();
        self.stop().await;
        records
    }

    async fn stop_serving(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.served.take() {
            let _ = h.await;
        }
    }

    pub async fn stop(mut self) {
        self.stop_serving().await;
        if let Some(e) = self.emulator.take() {
            e.shutdown().await;
        }
    }
}

/// How many requests audit records stand for: a summary of repeated refusals stands for
/// `repeats`, any other record for one.
pub fn requests_in(records: &[AuditRecord]) -> u64 {
    records.iter().map(|r| r.repeats.unwrap_or(1)).sum()
}

/// A policy granting each `(caller, tenant, scope)`.
pub fn grants(items: &[(&str, &str, &str)]) -> String {
    items
        .iter()
        .map(|(c, t, s)| {
            format!("[[grant]]\ncallers = [\"{c}\"]\ntenants = [\"{t}\"]\nscopes = [\"{s}\"]\n\n")
        })
        .collect()
}

/// The `retry-after` seconds a refusal carries.
#[track_caller]
pub fn retry_after_secs(s: &tonic::Status) -> u64 {
    s.metadata()
        .get("retry-after")
        .expect("a retry-after hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    words: &[&str],
) -> tonic::Status {
    let s = r.expect_err("expected an error status");
    assert_eq!(s.code(), code, "{s:?}");
    for w in words {
        assert!(s.message().contains(w), "`{w}` not in `{}`", s.message());
    }
    s
}
