//! Command line: `serve`, `dev`, `emulator`, `token`, `check-config`.

#[cfg(feature = "emulator")]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError, process_env};
use crate::proto;
use crate::telemetry;

/// Exit code for an invalid configuration (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// `token`: a usage error (as clap's own), such as an `--addr` without http:// or https://.
pub const EXIT_USAGE: u8 = 2;
/// `token`: worth retrying later: the broker could not be reached or answered UNAVAILABLE,
/// DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `token`: the broker does not know or does not allow this caller: UNAUTHENTICATED or
/// PERMISSION_DENIED, or its TLS refused the client certificate or wanted one (sysexits
/// EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

#[derive(Debug, Parser)]
#[command(
    name = "tokenbroker",
    version,
    about = "Entra ID tokens for many tenants, signed by Key Vault, served over gRPC. Holds no secrets."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker with a configuration file.
    #[command(
        after_help = "Exit status: 0 after a clean shutdown (SIGTERM, SIGINT); 78 (EX_CONFIG) when the configuration is invalid (nothing is started); 1 when the broker cannot start or stops on an error."
    )]
    Serve {
        /// The broker's configuration (TOML); check it first with `tokenbroker check-config`.
        /// TOKENBROKER_* environment variables override its deployment settings.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the broker on the embedded Azure emulator with a demo configuration (loopback only).
    #[cfg(feature = "emulator")]
    Dev {
        /// gRPC listen address (loopback).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Where to write the emulator endpoints, its CA and the generated broker config.
        #[arg(long, default_value = ".tokenbroker-dev")]
        state_dir: PathBuf,
    },
    /// Run the local Azure emulator alone (managed identity, Key Vault, Entra ID).
    #[cfg(feature = "emulator")]
    Emulator {
        /// Emulator configuration (TOML, docs/EMULATOR.md); the demo tenants of
        /// `tokenbroker dev` when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Written (JSON) once all listeners are up.
        #[arg(long)]
        endpoints_file: PathBuf,
    },
    /// Ask a running broker for a token and print it (for scripts and collectors).
    #[command(
        after_help = "Exit status: 0 with the token printed; 2 usage error (a bad option, an --addr without http:// or https://); 69 (EX_UNAVAILABLE) worth retrying: the broker could not be reached or answered UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (a retry-after hint is printed when the broker gives one); 77 (EX_NOPERM) the broker refused this caller: UNAUTHENTICATED or PERMISSION_DENIED, or its TLS refused the client certificate (or required one); 1 any other failure, such as an --addr whose host name does not exist, or a broker certificate this side refuses (expired, say)."
    )]
    Token {
        /// The tenant's name in the broker's configuration.
        #[arg(long)]
        tenant: String,
        /// A scope to ask for (repeatable), e.g. https://graph.microsoft.com/.default.
        #[arg(long, required = true)]
        scope: Vec<String>,
        /// The broker's gRPC address: http://HOST:PORT (plaintext) or https://HOST:PORT (TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Minimum remaining validity, in seconds (0 to 86400, as the broker accepts).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=crate::broker::MAX_MIN_VALIDITY.as_secs()))]
        min_validity: Option<u64>,
        /// A fresh token from Entra ID rather than the cached one (the broker limits how often).
        #[arg(long)]
        force_refresh: bool,
        /// A resource's claims challenge: the `claims` value of its `WWW-Authenticate: Bearer
        /// error="insufficient_claims"` answer (base64, as it came, or its JSON). A fresh
        /// token carrying those claims (the broker limits how often).
        #[arg(long)]
        claims: Option<String>,
        /// Print the whole response as JSON instead of the bare token.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds (1 to 3600), connecting included.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// PEM bundle of the CA that signs the broker's certificate (with an https:// address;
        /// default: the platform roots).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Client certificate (PEM) for mutual TLS; goes with --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key (PEM) of the client certificate.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// File holding a bearer token (JWT), sent as `authorization: Bearer`. Read at each run,
        /// so a rotated token file (Kubernetes projected token) just works.
        #[arg(long)]
        bearer_file: Option<PathBuf>,
    },
    /// Validate a configuration file and explain every problem with its location.
    #[command(
        after_help = "Exit status: 0 when the configuration is valid (WARNING lines included: they name settings that leave part of the broker unusable, legitimate while a deployment is set up in stages); 78 (EX_CONFIG) on any problem, listed on stderr; with --online, 1 unless every tenant got a token."
    )]
    CheckConfig {
        /// The configuration file (TOML) to check, as `serve --config` would read it,
        /// including the TOKENBROKER_* environment overrides of this shell.
        file: PathBuf,
        /// The files the configuration names (the TLS certificate and key, CA bundles,
        /// revocation lists, the policy file, the audit file's directory) exist only where
        /// the broker runs, such as mounted secrets: check everything else and list them as
        /// not checked.
        #[arg(long, conflicts_with = "online")]
        files_elsewhere: bool,
        /// Also try each tenant's whole path from here (managed identity, Key Vault or the
        /// HSM, Entra ID) by asking for a token as a caller would; run it where the broker
        /// runs. A line per tenant; exit status 1 unless every tenant got a token.
        #[arg(long)]
        online: bool,
        /// With --online: only this tenant (repeatable).
        #[arg(long, requires = "online")]
        tenant: Vec<String>,
        /// With --online: the scope to ask for (repeatable, one request); default: each
        /// tenant's pre-warm scopes ([resilience] prewarm), else Microsoft Graph's
        /// `/.default` in the configured cloud (any consented app gets that token).
        #[arg(long, requires = "online")]
        scope: Vec<String>,
        /// With --online: seconds to wait for each tenant's token (1 to 3600).
        #[arg(long, requires = "online", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// With --online: the report as one JSON document.
        #[arg(long, requires = "online")]
        json: bool,
    },
    /// Benchmarks on loopback (docs/PERFORMANCE.md): cache-hit load against a bare gRPC
    /// baseline, cold path, upstream economy, memory per cached token, start-up time.
    #[cfg(feature = "emulator")]
    Bench(crate::bench::BenchArgs),
}

/// Writes `text` and a newline to stdout. A closed or failing stdout (`| head`, a full disk)
/// is an error the caller's script must see, not a panic: exit 1 with a message that never
/// repeats `text` (it may be a token).
fn print_out(command: &str, text: &str) -> ExitCode {
    match write_stdout(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{command}: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `text` and a newline on stdout, whole and flushed; an error instead of `println!`'s panic.
fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush())
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        #[cfg(feature = "emulator")]
        Command::Dev { listen, state_dir } => dev(listen, state_dir).await,
        #[cfg(feature = "emulator")]
        Command::Emulator {
            config,
            endpoints_file,
        } => {
            let _telemetry = telemetry::init(crate::config::LogFormat::Human, "info");
            match crate::emulator::run_standalone(config.as_deref(), &endpoints_file).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokenbroker emulator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            tenant,
            scope,
            addr,
            min_validity,
            force_refresh,
            claims,
            json,
            timeout,
            ca,
            cert,
            key,
            bearer_file,
        } => {
            let req = proto::GetTokenRequest {
                tenant,
                scopes: scope,
                min_validity: min_validity.map(|s| prost_types::Duration {
                    // Within 0..=3600 (clap): no wrap.
                    seconds: i64::try_from(s).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                force_refresh,
                claims: claims.unwrap_or_default(),
            };
            let auth = CallerAuth {
                ca,
                cert: cert.zip(key),
                bearer_file,
            };
            match request_token(&addr, req, Duration::from_secs(timeout), &auth).await {
                Ok(resp) => {
                    let out = if json {
                        response_json(&resp)
                    } else {
                        resp.access_token
                    };
                    print_out("tokenbroker token", &out)
                }
                Err(e) => {
                    eprintln!("tokenbroker token: {}", e.message);
                    ExitCode::from(e.exit)
                }
            }
        }
        #[cfg(feature = "emulator")]
        Command::Bench(args) => crate::bench::run(args).await,
        Command::CheckConfig {
            file,
            online: true,
            tenant,
            scope,
            timeout,
            json,
            ..
        } => check_online(&file, &tenant, &scope, Duration::from_secs(timeout), json).await,
        Command::CheckConfig {
            file,
            files_elsewhere,
            ..
        } => match check_config(&file, files_elsewhere, &process_env, env_names()) {
            Ok(report) => print_out("tokenbroker check-config", &report),
            Err(problems) => {
                eprintln!("{problems}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

/// The names of this process's environment variables (those that are Unicode).
fn env_names() -> impl Iterator<Item = String> {
    std::env::vars_os().filter_map(|(k, _)| k.into_string().ok())
}

/// `check-config` without `--online`: the report, or the problems (exit `EXIT_CONFIG`).
fn check_config(
    file: &std::path::Path,
    files_elsewhere: bool,
    env: crate::config::EnvSource<'_>,
    env_names: impl IntoIterator<Item = String>,
) -> Result<String, String> {
    let checked = if files_elsewhere {
        Config::check_without_files(file, env)
    } else {
        Config::load(file, env).map(|c| (c, Vec::new()))
    };
    let (c, unchecked) = checked.map_err(|e| config_error(file, &e))?;
    let mut text = format!("{}: OK\n{}", file.display(), c.summary());
    for f in unchecked {
        text.push_str(&format!("\nnot checked here (--files-elsewhere): {f}"));
    }
    // Valid, so exit 0, but what they say stops part of the broker working.
    for w in c
        .warnings
        .iter()
        .chain(&crate::config::unknown_env_warnings(env_names, &c))
    {
        text.push_str(&format!("\nWARNING: {w}"));
    }
    Ok(text)
}

/// A configuration error as printed: prefixed with the file, unless it already names it.
fn config_error(path: &std::path::Path, e: &ConfigError) -> String {
    match e {
        ConfigError::Read { .. } => e.to_string(),
        ConfigError::Invalid(_) => format!("{}: {e}", path.display()),
    }
}

fn load_or_exit(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, &process_env).map_err(|e: ConfigError| {
        eprintln!("{}", config_error(path, &e));
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `check-config --online`: the configuration checked, then each tenant tried (`probe`).
async fn check_online(
    path: &std::path::Path,
    tenants: &[String],
    scopes: &[String],
    bound: Duration,
    json: bool,
) -> ExitCode {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The report is the output; the log (stderr) only says what went wrong.
    let _telemetry = telemetry::init(config.log.format, "warn");
    let up = match crate::server::upstreams(&config) {
        Ok(up) => up,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match crate::probe::check(&config, up, tenants, scopes, bound).await {
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Ok(checks) => {
            let text = if json {
                crate::probe::report_json(&checks).to_string()
            } else {
                format!(
                    "{}: configuration OK; each tenant tried:\n{}",
                    path.display(),
                    crate::probe::report(&checks)
                )
            };
            match print_out("tokenbroker check-config", &text) {
                code if code != ExitCode::SUCCESS => code,
                _ if checks.iter().all(|c| c.outcome.is_ok()) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    let config = match load_or_exit(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Flushes exported spans when serving ends.
    let _telemetry = telemetry::init_with(config.log.format, &config.log.level, &config.telemetry);
    for w in config
        .warnings
        .iter()
        .chain(&crate::config::unknown_env_warnings(env_names(), &config))
    {
        tracing::warn!(config = %path.display(), "{w}");
    }
    let result = async {
        let up = crate::server::upstreams(&config)?;
        let bound = crate::server::bind(config, up).await?;
        if let Ok(a) = bound.admin_addr() {
            tracing::info!(admin = %a, "admin listener: /metrics, /healthz, /readyz");
        }
        bound.serve(shutdown_signal()).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tokenbroker stopped");
            eprintln!("tokenbroker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `addr` bound (not listening): no other listener can take it while this is held.
#[cfg(feature = "emulator")]
fn reserve(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

#[cfg(feature = "emulator")]
async fn dev(listen: SocketAddr, state_dir: PathBuf) -> ExitCode {
    use crate::emulator::{Emulator, EmulatorConfig, StartOptions};
    if !listen.ip().is_loopback() {
        eprintln!("tokenbroker dev listens on loopback only, not {listen}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let result = async {
        // The address is taken before anything is written: a second `dev` on the address of
        // one already running would otherwise replace its endpoints, CA and configuration
        // in a shared state directory with those of an emulator that exits with it. Held
        // until the broker binds it (a port of 0 is the broker's own pick): bound, not
        // listening, so a client connecting meanwhile is refused rather than accepted by the
        // kernel and reset, and with SO_REUSEADDR as the broker's own listener, so that the
        // last run's connections in TIME_WAIT do not refuse a restart.
        let reserved = match listen.port() {
            0 => None,
            _ => Some(
                reserve(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?,
            ),
        };
        std::fs::create_dir_all(&state_dir)?;
        let state_dir = std::fs::canonicalize(&state_dir)?;
        let emu_config = EmulatorConfig::demo();
        let emulator = Emulator::start(
            emu_config.clone(),
            StartOptions::new(state_dir.join("ca.pem")),
        )
        .await?;
        emulator
            .endpoints()
            .write_atomically(&state_dir.join("endpoints.json"))?;
        // The log and trace export follow the environment (`TOKENBROKER_LOG_LEVEL`,
        // `TOKENBROKER_LOG_FORMAT`, `TOKENBROKER_OTLP_ENDPOINT`); nothing else does.
        let (config_path, config) = crate::dev::write_broker_config(
            &state_dir,
            &emu_config,
            emulator.endpoints(),
            listen,
            &crate::config::observability_env,
        )?;
        // Flushes exported spans and metrics when serving ends.
        let _telemetry =
            telemetry::init_with(config.log.format, &config.log.level, &config.telemetry);
        let up = crate::server::upstreams(&config)?;
        let tenants: Vec<String> = config.tenants.keys().cloned().collect();
        drop(reserved);
        let bound = crate::server::bind(config, up).await?;
        let addr = bound.local_addr()?;
        let admin = bound.admin_addr()?;
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "tokenbroker".into());
        // Written whole, and a closed stdout (`tokenbroker dev | head`) must not stop the
        // broker: `println!` would panic on the broken pipe.
        let banner = format!(
            "\ntokenbroker dev is up: broker on {addr} (plaintext, loopback), Azure emulator endpoints in {}\n\
             broker config: {}\naudit log: {}\nmetrics and probes: http://{admin}/metrics, /healthz, /readyz\n\ntenants: {}\n\nAsk for a token:\n  {exe} token --addr http://{addr} --tenant {} --scope https://graph.microsoft.com/.default\n\n\
             Stop with Ctrl-C.",
            state_dir.join("endpoints.json").display(),
            config_path.display(),
            crate::dev::audit_file(emulator.endpoints()).display(),
            tenants.join(", "),
            tenants.first().map(String::as_str).unwrap_or("contoso"),
        );
        let _ = write_stdout(&banner);
        bound.serve(shutdown_signal()).await?;
        emulator.shutdown().await;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: the broker's errors already quote their source.
            eprintln!(
                "tokenbroker dev: {}",
                crate::outbound::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How `token` proves who it is to the broker.
#[derive(Debug, Default)]
pub struct CallerAuth {
    pub ca: Option<PathBuf>,
    /// Client certificate and key files.
    pub cert: Option<(PathBuf, PathBuf)>,
    pub bearer_file: Option<PathBuf>,
}

/// Why `token` failed, and the exit status that tells a script whether to retry.
#[derive(Debug)]
pub struct TokenFailure {
    pub message: String,
    /// `EXIT_USAGE`, `EXIT_UNAVAILABLE`, `EXIT_NOPERM` or 1.
    pub exit: u8,
}

impl TokenFailure {
    fn usage(message: impl Into<String>) -> Self {
        TokenFailure {
            message: message.into(),
            exit: EXIT_USAGE,
        }
    }

    fn other(message: impl Into<String>) -> Self {
        TokenFailure {
            message: message.into(),
            exit: 1,
        }
    }

    /// The broker's answer: its code decides the exit status, and a retry hint is passed on.
    fn status(s: &tonic::Status) -> Self {
        let exit = exit_status(s.code());
        let retry = s
            .metadata()
            .get(crate::api::error::RETRY_AFTER_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|secs| format!(" (retry after {secs} s)"))
            .unwrap_or_default();
        TokenFailure {
            // The code as gRPC and the docs name it (`FAILED_PRECONDITION`).
            message: format!(
                "{}: {}{retry}",
                crate::api::error::code_name(s.code()),
                s.message()
            ),
            exit,
        }
    }
}

/// The exit status for a call that ended with `code`.
fn exit_status(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => EXIT_UNAVAILABLE,
        Code::Unauthenticated | Code::PermissionDenied => EXIT_NOPERM,
        _ => 1,
    }
}

/// Asks the broker at `addr` for a token; the failure as a message.
pub async fn token(
    addr: &str,
    req: proto::GetTokenRequest,
    timeout: Duration,
    auth: &CallerAuth,
) -> Result<proto::GetTokenResponse, String> {
    request_token(addr, req, timeout, auth)
        .await
        .map_err(|f| f.message)
}

/// `--addr` is http:// or https:// (in any case, as URI schemes are), returned with its
/// scheme in lower case: anything else is a usage error with the fix.
fn check_addr(addr: &str) -> Result<String, TokenFailure> {
    match addr.split_once("://") {
        Some((scheme, rest))
            if !rest.is_empty()
                && (scheme.eq_ignore_ascii_case("http")
                    || scheme.eq_ignore_ascii_case("https")) =>
        {
            Ok(format!("{}://{rest}", scheme.to_ascii_lowercase()))
        }
        Some((scheme, _)) => Err(TokenFailure::usage(format!(
            "--addr {addr}: `{scheme}://` is not a broker address; use http://HOST:PORT (plaintext) or https://HOST:PORT"
        ))),
        None => Err(TokenFailure::usage(format!(
            "--addr {addr} has no scheme: use http://{addr} (plaintext) or https://{addr}"
        ))),
    }
}

/// As `token`, with the exit status. `timeout` bounds the whole call, connecting included.
pub async fn request_token(
    addr: &str,
    req: proto::GetTokenRequest,
    timeout: Duration,
    auth: &CallerAuth,
) -> Result<proto::GetTokenResponse, TokenFailure> {
    let addr = &check_addr(addr)?;
    if timeout.is_zero() {
        return Err(TokenFailure::usage("--timeout must be at least 1 second"));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| TokenFailure::usage(format!("bad --addr {addr}: {e}")))?
        .connect_timeout(timeout);
    let uri = endpoint.uri().clone();
    let tls = uri.scheme_str() == Some("https");
    let read = |p: &PathBuf| {
        std::fs::read(p)
            .map_err(|e| TokenFailure::other(format!("cannot read {}: {e}", p.display())))
    };
    // What the TLS files hold: the connection's trust and client certificate.
    let mut files = TlsFiles::default();
    if tls {
        if let Some(ca) = &auth.ca {
            files.roots = Some(certificates("--ca", ca, &read(ca)?)?);
        }
        if let Some((cert, key)) = &auth.cert {
            let (cert_pem, key_pem) = (read(cert)?, read(key)?);
            files.identity = Some(client_identity((cert, &cert_pem), (key, &key_pem))?);
        }
    } else if auth.ca.is_some() || auth.cert.is_some() {
        return Err(TokenFailure::usage(
            "--ca, --cert and --key need an https:// --addr",
        ));
    }
    let mut request = tonic::Request::new(req);
    // The broker learns the deadline (grpc-timeout); here it is enforced once, below, for
    // connecting and the call together, so running out of time is always the same failure.
    request.set_timeout(timeout);
    if let Some(path) = &auth.bearer_file {
        let loopback = uri
            .host()
            .map(|h| h.trim_matches(['[', ']']))
            .is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if !tls && !loopback {
            return Err(TokenFailure::usage(
                "refusing to send a bearer token over plaintext to a non-loopback address; use https://",
            ));
        }
        let raw = crate::sensitive::Sensitive::new(
            String::from_utf8(read(path)?)
                .map_err(|_| TokenFailure::other(format!("{}: not UTF-8", path.display())))?,
        );
        // The file may hold the header's whole value, as some tools write it.
        let token = raw.expose().trim();
        let token = match (token.get(..6), token.get(6..)) {
            (Some(p), Some(rest))
                if p.eq_ignore_ascii_case("bearer")
                    && (rest.is_empty() || rest.starts_with(char::is_whitespace)) =>
            {
                rest.trim_start()
            }
            _ => token,
        };
        // A projected token file not written yet, say: the broker would only say the header
        // is not `Bearer <jwt>`, and refuse the caller.
        if token.is_empty() {
            return Err(TokenFailure::other(format!(
                "{} holds no token: --bearer-file names the file holding the caller's bearer token (a JWT)",
                path.display()
            )));
        }
        let value = format!("Bearer {token}").parse().map_err(|_| {
            TokenFailure::other(format!(
                "{}: the token is not a valid header value",
                path.display()
            ))
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    let files_config = match tls {
        true => Some(Arc::new(client_tls(&files).await.map_err(|e| {
            TokenFailure::other(format!("TLS setup for {addr}: {e}"))
        })?)),
        false => None,
    };
    let started = tokio::time::Instant::now();
    let out_of_time = || TokenFailure {
        message: format!(
            "no answer from {addr} within {} s (--timeout)",
            timeout.as_secs()
        ),
        exit: EXIT_UNAVAILABLE,
    };
    let call = async {
        let connected = match &files_config {
            Some(config) => {
                // Plain http:// to the connector, which speaks TLS itself; requests still
                // name the https:// address.
                let plain = tonic::transport::Endpoint::from_shared(format!(
                    "http://{}",
                    uri.authority().map(|a| a.as_str()).unwrap_or_default()
                ))
                .map_err(|e| TokenFailure::usage(format!("bad --addr {addr}: {e}")))?
                .origin(uri.clone())
                .connect_timeout(timeout);
                plain
                    .connect_with_connector(FirstWord {
                        config: config.clone(),
                    })
                    .await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|e| {
            let why = crate::outbound::error_chain(&e);
            // With TLS 1.2 a refused client certificate ends the handshake itself.
            if let Some(name) = alert(&why) {
                return refused_by_tls(addr, name);
            }
            let hint = connect_hint(tls, auth.ca.as_deref(), &why);
            // A hint, a host name that does not exist, or a broker certificate this side
            // refuses (expired, say) is a mistake to fix, which retrying does not.
            let mistake = !hint.is_empty()
                || crate::outbound::does_not_resolve(&why)
                || why.contains(REFUSED_PEER_CERT);
            TokenFailure {
                message: format!("cannot connect to {addr}: {why}{hint}"),
                exit: if mistake { 1 } else { EXIT_UNAVAILABLE },
            }
        })?;
        let mut client = proto::token_broker_client::TokenBrokerClient::new(channel);
        let s = match client.get_token(request).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        // tonic's own deadline (from grpc-timeout) answers CANCELLED.
        if started.elapsed() >= timeout {
            return Err(out_of_time());
        }
        // A status tonic made of a failed connection, not the broker's answer: it says
        // "transport error", its causes say why.
        let Some(e) = std::error::Error::source(&s).filter(|e| e.is::<tonic::transport::Error>())
        else {
            return Err(TokenFailure::status(&s));
        };
        let why = crate::outbound::error_chain(e);
        if !tls && serves_tls(&uri).await {
            return Err(TokenFailure::other(format!(
                "the connection to {addr} failed: the broker serves TLS there: try an https:// --addr"
            )));
        }
        Err(match alert(&why) {
            Some(name) => refused_by_tls(addr, name),
            None => {
                let hint = connect_hint(tls, auth.ca.as_deref(), &why);
                TokenFailure {
                    exit: if hint.is_empty() {
                        exit_status(s.code())
                    } else {
                        1
                    },
                    message: format!("the connection to {addr} failed: {why}{hint}"),
                }
            }
        })
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(out_of_time()))
}

/// The certificates of the PEM file given as `flag`, or what is wrong with it: tonic takes
/// any bytes and fails later with a bare "transport error" (`--cert`) or an unknown issuer
/// (`--ca`).
fn certificates(
    flag: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TokenFailure> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TokenFailure::other(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        let instead = match (PrivateKeyDer::from_pem_slice(pem).is_ok(), flag) {
            (true, "--cert") => " but a private key, which goes with --key",
            (true, _) => " but a private key",
            (false, _) => "",
        };
        return Err(TokenFailure::other(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----){instead}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client certificate chain of `--cert` and the private key of `--key`, checked to be
/// what they say and to belong together. The key file's parse error is not quoted, so no
/// part of the key file reaches the message.
fn client_identity(
    (cert, cert_pem): (&Path, &[u8]),
    (key, key_pem): (&Path, &[u8]),
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TokenFailure> {
    let chain = certificates("--cert", cert, cert_pem)?;
    let Ok(private) = PrivateKeyDer::from_pem_slice(key_pem) else {
        let instead = if CertificateDer::pem_slice_iter(key_pem).next().is_some() {
            " but a certificate, which goes with --cert"
        } else {
            ""
        };
        return Err(TokenFailure::other(format!(
            "--key {} holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY){instead}",
            key.display()
        )));
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider) {
        Ok(_) => Ok((chain, private)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TokenFailure::other(format!(
            "--key {} is not the private key of the certificate in --cert {}",
            key.display(),
            cert.display()
        ))),
        Err(e) => Err(TokenFailure::other(format!("--key {}: {e}", key.display()))),
    }
}

/// The trust and client certificate of a TLS call.
#[derive(Default)]
struct TlsFiles {
    /// `--ca`'s certificates; none: the platform roots.
    roots: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// At most this long for `serves_tls`, or for the broker's first word (`FirstWord`) (within
/// `--timeout`).
const PROBE_BOUND: Duration = Duration::from_secs(2);

/// The rustls configuration of a call with `files`.
async fn client_tls(files: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let trusted = match &files.roots {
        Some(r) => r.clone(),
        // The platform's roots (read from disk).
        None => tokio::task::spawn_blocking(|| rustls_native_certs::load_native_certs().certs)
            .await
            .map_err(|e| e.to_string())?,
    };
    roots.add_parsable_certificates(trusted);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects with TLS and reads the broker's first word before the connection is handed to
/// HTTP/2: its alert, when it refuses the client certificate, or its HTTP/2 settings. With
/// TLS 1.3 the broker checks a client certificate after the client has finished its
/// handshake; read later, by the HTTP/2 client that has sent its request meanwhile, the
/// refusal is the broker's alert or a bare "connection closed", whichever it notices first.
/// Read here, it is always the alert, on the one connection (one handshake, one line in the
/// broker's log), not asked again on a second one.
#[derive(Clone)]
struct FirstWord {
    config: Arc<rustls::ClientConfig>,
}

type TlsIo =
    hyper_util::rt::TokioIo<Prefixed<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

impl tonic::codegen::Service<http::Uri> for FirstWord {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsIo, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            use tokio::io::AsyncReadExt;
            let invalid =
                |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host"))?
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| invalid("not a host name"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let mut stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let mut first = vec![0u8; 1024];
            // Bounded: a server that waits for the client to speak first (a proxy, say)
            // gets the connection as it is, its verdict then read by the call.
            match tokio::time::timeout(PROBE_BOUND, stream.read(&mut first)).await {
                Ok(Ok(0)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection after the TLS handshake",
                    ));
                }
                Ok(Ok(n)) => first.truncate(n),
                Ok(Err(e)) => return Err(e),
                Err(_) => first.clear(),
            }
            Ok(hyper_util::rt::TokioIo::new(Prefixed {
                first,
                at: 0,
                inner: stream,
            }))
        })
    }
}

/// A stream whose first bytes, already read, are read again first.
struct Prefixed<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.first.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether what listens at `uri` answers the start of plaintext HTTP/2 with a TLS record
/// (rustls's alert), as a TLS listener does. An `http://` call to one fails with a broken
/// pipe, a closed connection or a bad HTTP/2 frame, depending on timing; this asks once
/// more, and always gets the same answer.
async fn serves_tls(uri: &http::Uri) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(host) = uri.host().map(|h| h.trim_matches(['[', ']'])) else {
        return false;
    };
    let port = uri.port_u16().unwrap_or(80);
    let answer = async {
        let mut tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await.ok()?;
        // A TLS alert record: content type 21, protocol version 3.x.
        Some(head == [0x15, 0x03])
    };
    matches!(
        tokio::time::timeout(PROBE_BOUND, answer).await,
        Ok(Some(true))
    )
}

/// The name of the TLS alert the broker sent, as rustls words it ("received fatal alert:
/// UnknownCA"), when `why` tells of one.
fn alert(why: &str) -> Option<&str> {
    const SAID: &str = "received fatal alert: ";
    let rest = &why[why.find(SAID)? + SAID.len()..];
    rest.split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .filter(|name| !name.is_empty())
}

/// The broker's TLS sent the alert `name`: what it means for the caller, and the exit status
/// (`EXIT_NOPERM` when it refused the client certificate or wanted one: rustls sends these
/// alerts for what its client verifier refuses, `AlertDescription::from(CertificateError)`).
fn refused_by_tls(addr: &str, name: &str) -> TokenFailure {
    let (refused, hint) = match name {
        "CertificateRequired" => (
            true,
            "; the broker requires a client certificate: pass --cert and --key",
        ),
        "UnknownCA" => (
            true,
            "; the broker does not trust the CA that issued the client certificate (--cert), or cannot tell whether it is revoked",
        ),
        "UnsupportedCertificate" => (
            true,
            "; the client certificate (--cert) is not for client authentication: it needs the clientAuth extended key usage",
        ),
        "CertificateExpired" => (
            true,
            "; the client certificate (--cert) has expired or is not valid yet",
        ),
        "CertificateRevoked" => (true, "; the client certificate (--cert) is revoked"),
        "BadCertificate" | "CertificateUnknown" | "AccessDenied" => {
            (true, "; the broker refused the client certificate (--cert)")
        }
        _ => (false, ""),
    };
    TokenFailure {
        message: format!("{addr} refused the TLS connection: received fatal alert: {name}{hint}"),
        exit: if refused { EXIT_NOPERM } else { 1 },
    }
}

/// How rustls begins a refusal of the certificate the broker presented.
const REFUSED_PEER_CERT: &str = "invalid peer certificate: ";

/// What to try when a connection failed for a reason a person can fix from the command line;
/// `ca` is the `--ca` given.
fn connect_hint(tls: bool, ca: Option<&Path>, why: &str) -> String {
    // rustls words an expired certificate either way, with or without the times.
    let refused_cert = why
        .split_once(REFUSED_PEER_CERT)
        .map_or("", |(_, reason)| reason);
    if tls
        && ["certificate expired", "Expired"]
            .iter()
            .any(|w| refused_cert.starts_with(w))
    {
        "; the broker's certificate must be renewed where the broker runs (or this host's clock is wrong)".into()
    } else if tls
        && ["certificate not valid yet", "NotValidYet"]
            .iter()
            .any(|w| refused_cert.starts_with(w))
    {
        "; the broker's certificate is not valid yet (or this host's clock is wrong)".into()
    } else if tls && (why.contains("InvalidContentType") || why.contains("corrupt message")) {
        "; the broker may be serving plaintext: try an http:// --addr".into()
    } else if tls && why.contains("UnknownIssuer") {
        match ca {
            Some(ca) => format!(
                "; the broker's certificate is not issued by a CA in --ca {}",
                ca.display()
            ),
            None => "; pass the CA that signs the broker's certificate with --ca".into(),
        }
    } else if tls && why.contains("not valid for name") {
        "; the broker's certificate does not name this host: use the name it was issued for".into()
    } else {
        String::new()
    }
}

fn response_json(r: &proto::GetTokenResponse) -> String {
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds).unwrap_or(0);
    serde_json::json!({
        "access_token": r.access_token,
        "token_type": r.token_type,
        "expires_on": ts(&r.expires_at),
        "refresh_at": ts(&r.refresh_at),
        "tenant_id": r.tenant_id,
        "client_id": r.client_id,
        "scopes": r.scopes,
        // As the audit trail names it (`CACHE`, `EXCHANGE`, `STALE_WHILE_REFRESH_FAILING`).
        "source": proto::TokenSource::try_from(r.source)
            .map(|s| s.as_str_name())
            .unwrap_or("TOKEN_SOURCE_UNSPECIFIED")
            .trim_start_matches("TOKEN_SOURCE_"),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_names_the_source_as_the_audit_trail_does() {
        let r = proto::GetTokenResponse {
            source: proto::TokenSource::StaleWhileRefreshFailing as i32,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&response_json(&r)).unwrap();
        assert_eq!(v["source"], "STALE_WHILE_REFRESH_FAILING");
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// A valid loopback configuration in a temporary directory, with `extra` appended.
    fn config_file(extra: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:50051\"\nplaintext = true\n\n\
                 [tenants.contoso]\ntenant_id = \"22222222-2222-2222-2222-222222222222\"\n\
                 client_id = \"33333333-3333-3333-3333-333333333333\"\n\
                 credential = {{ type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"contoso-app\" }}\n{extra}"
            ),
        )
        .unwrap();
        (dir, path)
    }

    #[test]
    fn check_config_prints_what_leaves_the_broker_unusable_as_warnings_and_still_passes() {
        let (_dir, path) = config_file("");
        let report = check_config(&path, false, &no_env, []).unwrap();
        assert!(report.contains(": OK\n"), "{report}");
        assert!(
            report.contains("\nWARNING: policy: no grants: every request is denied"),
            "{report}"
        );
        assert!(
            report.contains("\nWARNING: callers: no caller can authenticate"),
            "{report}"
        );
        let (_dir, path) = config_file(
            "[callers]\ndev_loopback = true\n[[policy.grant]]\ncallers = [\"dev:loopback\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
        );
        let report = check_config(&path, false, &no_env, []).unwrap();
        assert!(!report.contains("WARNING"), "{report}");
    }

    #[test]
    fn an_address_without_http_or_https_is_a_usage_error_with_the_fix() {
        let e = check_addr("127.0.0.1:50051").unwrap_err();
        assert_eq!(e.exit, EXIT_USAGE);
        assert!(
            e.message
                .contains("use http://127.0.0.1:50051 (plaintext) or https://127.0.0.1:50051"),
            "{}",
            e.message
        );
        let e = check_addr("ftp://broker:50051").unwrap_err();
        assert_eq!(e.exit, EXIT_USAGE);
        assert!(e.message.contains("http://HOST:PORT"), "{}", e.message);
        check_addr("http://127.0.0.1:50051").unwrap();
        assert_eq!(
            check_addr("HTTPS://broker.example:443").unwrap(),
            "https://broker.example:443",
            "schemes are case-insensitive"
        );
        check_addr("https://broker.example:443").unwrap();
        // clap refuses a zero timeout (exit 2) before anything runs.
        let zero = token_with("--timeout", "0").unwrap_err();
        assert_eq!(zero.exit_code(), 2);
        // So does `check-config --online`, which would otherwise report every tenant as
        // failing (no answer within 0 s) and exit 1.
        let online = |secs: &str| {
            Cli::try_parse_from([
                "tokenbroker",
                "check-config",
                "broker.toml",
                "--online",
                "--timeout",
                secs,
            ])
        };
        assert_eq!(online("0").unwrap_err().exit_code(), 2);
        assert!(online("60").is_ok());
    }

    /// `tokenbroker token` for a tenant and scope, with `option` set to `value`.
    fn token_with(option: &str, value: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([
            "tokenbroker",
            "token",
            "--tenant",
            "t",
            "--scope",
            "s",
            option,
            value,
        ])
    }

    #[test]
    fn a_min_validity_the_broker_would_refuse_is_a_usage_error() {
        let parse = |secs: &str| token_with("--min-validity", secs);
        // Above i64::MAX it used to wrap to a negative duration; above a day the broker
        // refuses it anyway.
        for secs in ["18446744073709551615", "9223372036854775808", "86401", "-1"] {
            let e = parse(secs).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{secs}: {e}");
        }
        for secs in ["0", "3600", "86400"] {
            assert!(parse(secs).is_ok(), "{secs}");
        }
    }

    #[test]
    fn the_exit_status_says_whether_to_retry_and_the_retry_hint_is_passed_on() {
        let mut busy = tonic::Status::unavailable("Key Vault is throttling");
        busy.metadata_mut()
            .insert(crate::api::error::RETRY_AFTER_KEY, "7".parse().unwrap());
        let f = TokenFailure::status(&busy);
        assert_eq!(f.exit, EXIT_UNAVAILABLE);
        assert!(f.message.ends_with("(retry after 7 s)"), "{}", f.message);
        for (status, exit) in [
            (tonic::Status::deadline_exceeded("slow"), EXIT_UNAVAILABLE),
            (tonic::Status::resource_exhausted("rate"), EXIT_UNAVAILABLE),
            (tonic::Status::unauthenticated("who"), EXIT_NOPERM),
            (tonic::Status::permission_denied("no"), EXIT_NOPERM),
            (tonic::Status::invalid_argument("scopes"), 1),
            (tonic::Status::not_found("tenant"), 1),
        ] {
            assert_eq!(TokenFailure::status(&status).exit, exit, "{status:?}");
        }
    }

    #[tokio::test]
    async fn a_broker_that_cannot_be_reached_is_worth_retrying_and_the_timeout_bounds_it() {
        // A port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let req = proto::GetTokenRequest::default();
        let e = request_token(
            &format!("http://{addr}"),
            req.clone(),
            Duration::from_secs(5),
            &CallerAuth::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit, EXIT_UNAVAILABLE, "{}", e.message);
        // A listener that never answers: given up after --timeout.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = request_token(
            &format!("http://{}", silent.local_addr().unwrap()),
            req,
            Duration::from_secs(1),
            &CallerAuth::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit, EXIT_UNAVAILABLE, "{}", e.message);
        assert!(
            e.message.contains("within 1 s (--timeout)"),
            "{}",
            e.message
        );
        // A host name that does not exist (RFC 6761: `.invalid` never resolves) is a mistake
        // to fix, not worth retrying; a resolver that does not answer is.
        let e = request_token(
            "http://broker.invalid:50051",
            proto::GetTokenRequest::default(),
            Duration::from_secs(10),
            &CallerAuth::default(),
        )
        .await
        .unwrap_err();
        let expected = if e.message.contains("DNS did not answer") {
            EXIT_UNAVAILABLE
        } else {
            1
        };
        assert!(
            e.message.contains("resolve") || e.message.contains("DNS"),
            "{}",
            e.message
        );
        assert_eq!(e.exit, expected, "{}", e.message);
    }

    #[test]
    fn check_config_names_the_missing_workload_identity_variables_unless_files_are_elsewhere() {
        let (_dir, path) = config_file("");
        let env =
            |k: &str| (k == "TOKENBROKER_IDENTITY_SOURCE").then(|| "workload_identity".into());
        let e = check_config(&path, false, &env, []).unwrap_err();
        assert!(
            e.contains("TOKENBROKER_IDENTITY_SOURCE: workload identity needs AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE in the broker's environment"),
            "{e}"
        );
        assert!(e.contains("azure.workload.identity/use"), "{e}");
        // Checked where the broker runs: here they are listed, not judged.
        let report = check_config(&path, true, &env, []).unwrap();
        assert!(
            report.contains("\nnot checked here (--files-elsewhere): TOKENBROKER_IDENTITY_SOURCE = workload_identity: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE"),
            "{report}"
        );
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named_once() {
        let missing = std::path::Path::new("/nowhere/broker.toml");
        let e = check_config(missing, false, &no_env, []).unwrap_err();
        assert_eq!(e.matches("/nowhere/broker.toml").count(), 1, "{e}");
        assert!(e.starts_with("cannot read /nowhere/broker.toml: "), "{e}");
    }

    #[tokio::test]
    async fn an_empty_bearer_file_is_named_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("empty", ""), ("blank", " \n"), ("header", "Bearer \n")] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            // Nothing listens there: the file is checked before any connection.
            let e = request_token(
                "http://127.0.0.1:9",
                proto::GetTokenRequest::default(),
                Duration::from_secs(5),
                &CallerAuth {
                    ca: None,
                    cert: None,
                    bearer_file: Some(path.clone()),
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.exit, 1, "{name}: {}", e.message);
            assert!(
                e.message.contains(&path.display().to_string()) && e.message.contains("no token"),
                "{name}: {}",
                e.message
            );
        }
    }

    #[tokio::test]
    async fn a_tls_file_holding_the_wrong_thing_is_named_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["cli".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert, key) = (
            write("cli.pem", &cert.pem()),
            write("cli.key", &key.serialize_pem()),
        );
        let other_key = write(
            "other.key",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        let empty = write("empty.pem", "");
        let key_body: String = std::fs::read_to_string(&key)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .into();
        let failure = async |auth: CallerAuth| {
            // Nothing listens there: the files are checked before any connection.
            let e = request_token(
                "https://127.0.0.1:9",
                proto::GetTokenRequest::default(),
                Duration::from_secs(5),
                &auth,
            )
            .await
            .unwrap_err();
            assert_eq!(e.exit, 1, "{}", e.message);
            assert!(
                !e.message.contains(&key_body),
                "no key material: {}",
                e.message
            );
            e.message
        };
        let with = |ca: &PathBuf, c: &PathBuf, k: &PathBuf| CallerAuth {
            ca: Some(ca.clone()),
            cert: Some((c.clone(), k.clone())),
            bearer_file: None,
        };
        let m = failure(with(&empty, &cert, &key)).await;
        assert!(
            m.contains("--ca") && m.contains("empty.pem holds no PEM certificate"),
            "{m}"
        );
        let m = failure(with(&key, &cert, &key)).await;
        assert!(
            m.contains("cli.key holds no PEM certificate") && m.ends_with("but a private key"),
            "{m}"
        );
        let m = failure(with(&cert, &key, &key)).await;
        assert!(
            m.contains("--cert")
                && m.contains("cli.key holds no PEM certificate")
                && m.contains("which goes with --key"),
            "{m}"
        );
        let m = failure(with(&cert, &cert, &cert)).await;
        assert!(
            m.contains("--key")
                && m.contains("cli.pem holds no PEM private key")
                && m.contains("which goes with --cert"),
            "{m}"
        );
        let m = failure(with(&cert, &cert, &other_key)).await;
        assert!(
            m.contains("other.key is not the private key of the certificate in --cert"),
            "{m}"
        );
        assert!(m.contains("cli.pem"), "{m}");
    }

    #[test]
    fn connection_failures_a_person_can_fix_come_with_a_hint() {
        // rustls's own texts, as the error chain shows them.
        let plaintext = "transport error: received corrupt message of type InvalidContentType";
        assert!(connect_hint(true, None, plaintext).contains("http://"));
        let ca = "transport error: invalid peer certificate: UnknownIssuer";
        assert!(
            connect_hint(true, None, ca)
                .contains("pass the CA that signs the broker's certificate with --ca")
        );
        // With a --ca that does not hold the broker's CA, asking for --ca would be no help.
        let given = connect_hint(true, Some(Path::new("other-ca.pem")), ca);
        assert!(
            given.contains("not issued by a CA in --ca other-ca.pem"),
            "{given}"
        );
        let name = "transport error: invalid peer certificate: certificate not valid for name \"10.0.0.1\"; certificate is only valid for DnsName(\"broker\")";
        assert!(connect_hint(true, None, name).contains("the name it was issued for"));
        let expired = "transport error: invalid peer certificate: certificate expired: verification time 1795510773 (UNIX), but certificate is not valid after 1580515200 (214995573 seconds ago)";
        assert!(connect_hint(true, None, expired).contains("must be renewed"));
        let early = "transport error: invalid peer certificate: NotValidYet";
        assert!(connect_hint(true, None, early).contains("not valid yet"));
        // Nothing to add: refused connections say so, and plaintext has no certificates.
        let refused = "transport error: tcp connect error: Connection refused (os error 111)";
        assert_eq!(connect_hint(true, None, refused), "");
        assert_eq!(connect_hint(false, None, ca), "");
    }
}
