use std::sync::Arc;

use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::*;
use crate::pki::{Ca, Leaf};

const COLLECTOR: &str = "spiffe://example.org/ns/logs/sa/collector";

/// A raw TLS 1.3 handshake and the start of HTTP/2. In TLS 1.3 the server judges the client
/// certificate after the client has finished, so its verdict arrives with the first read:
/// the server's SETTINGS frame, or a fatal alert.
pub(crate) async fn handshake(
    h: &Harness,
    server_ca: &str,
    client: Option<&Leaf>,
) -> Result<(), String> {
    open_h2(h, server_ca, client).await.map(drop)
}

/// A TLS connection that has sent the HTTP/2 preface and read the server's SETTINGS frame.
pub(crate) async fn open_h2(
    h: &Harness,
    server_ca: &str,
    client: Option<&Leaf>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    open_h2_with(h, client_config(server_ca, client)).await
}

/// A client configuration (with rustls' default session cache, so connections made with
/// the same one resume their session when the server allows it).
pub(crate) fn client_config(server_ca: &str, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some(l) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(l.cert_pem.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

async fn open_h2_with(
    h: &Harness,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| e.to_string())?;
    let mut frame = [0u8; 9];
    tls.read_exact(&mut frame)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(frame[3], 4, "the server's first frame is SETTINGS");
    let mut payload = vec![0u8; u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize];
    tls.read_exact(&mut payload)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

pub(crate) type Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The next HTTP/2 frame: its type, flags and payload (after a 9-byte header: 24-bit
/// length, type, flags, stream id).
pub(crate) async fn next_frame(conn: &mut Conn) -> std::io::Result<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    conn.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).await?;
    Ok((header[3], header[4], payload))
}

/// The payload of the next GOAWAY (type 7) the server sends.
async fn next_goaway(conn: &mut Conn) -> Vec<u8> {
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let (kind, _, payload) = next_frame(conn).await?;
            if kind == 7 {
                return Ok::<_, std::io::Error>(payload);
            }
        }
    })
    .await
    .expect("a GOAWAY within the bound")
    .expect("a GOAWAY before the connection closed")
}

/// Every reason `tokenbroker_tls_handshakes_refused_total` can carry.
const REFUSALS: [&str; 13] = [
    "no_certificate",
    "unknown_issuer",
    "outside_validity",
    "revoked",
    "revocation_unknown",
    "wrong_purpose",
    "not_vouched_for",
    "bad_certificate",
    "client_alert",
    "protocol",
    "connection_lost",
    "timed_out",
    "over_capacity",
];

/// Waits (bounded) until the listener's refused handshakes are `expected`, every reason
/// not named at 0: the broker counts a refusal after the client has read its alert.
async fn refusals_reach(h: &Harness, expected: &[(&str, u64)]) {
    let want: Vec<(&str, u64)> = REFUSALS
        .iter()
        .map(|r| {
            let n = expected.iter().find(|(e, _)| e == r).map_or(0, |(_, n)| *n);
            (*r, n)
        })
        .collect();
    let mut seen = Vec::new();
    for _ in 0..200 {
        let text = h.metrics().await;
        seen = REFUSALS
            .iter()
            .map(|r| {
                let line = format!("tokenbroker_tls_handshakes_refused_total{{reason=\"{r}\"}} ");
                let n = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&line))
                    .unwrap_or_else(|| panic!("no {line}in\n{text}"));
                (*r, n.parse().unwrap())
            })
            .collect();
        if seen == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("refused handshakes: {seen:?}, expected {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_told_to_take_new_calls_elsewhere_at_its_maximum_age() {
    let h = Harness::start(Options {
        server: "max_connection_age_secs = 1",
        ..Default::default()
    })
    .await;
    let mut conn = open_h2(&h, &h.server_ca_pem, None).await.unwrap();
    let goaway = next_goaway(&mut conn).await;
    // Error code NO_ERROR: a graceful goodbye (the first of the two GOAWAYs of a graceful
    // close, which still admits streams the client may have in flight).
    assert_eq!(&goaway[4..8], &[0u8; 4], "{goaway:?}");
    drop(conn);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_told_at_its_own_maximum_age_drawn_when_it_opens() {
    // The first connection is drawn an hour, the second the configured second.
    let drawn = Arc::new(std::sync::Mutex::new(Vec::new()));
    let d = drawn.clone();
    let h = Harness::start(Options {
        server: "max_connection_age_secs = 1",
        connection_age: Some(Arc::new(move |age| {
            let mut d = d.lock().unwrap();
            d.push(age);
            if d.len() == 1 {
                std::time::Duration::from_secs(3600)
            } else {
                age
            }
        })),
        ..Default::default()
    })
    .await;
    // One after the other, so that their ages are drawn in this order.
    let mut first = open_h2(&h, &h.server_ca_pem, None).await.unwrap();
    let mut second = open_h2(&h, &h.server_ca_pem, None).await.unwrap();
    let goaway = next_goaway(&mut second).await;
    assert_eq!(&goaway[4..8], &[0u8; 4], "{goaway:?}");
    // An age drawn for each connection, from the configured one.
    assert_eq!(
        *drawn.lock().unwrap(),
        [std::time::Duration::from_secs(1); 2]
    );
    // The first connection, older than the second, still takes calls: a PING (type 6) is
    // answered (flag ACK) with no GOAWAY before it. With one age for both, its GOAWAY would
    // have come before the second's.
    first
        .write_all(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .unwrap();
    loop {
        let (kind, flags, payload) = next_frame(&mut first).await.unwrap();
        assert_ne!(kind, 7, "the first connection was sent GOAWAY: {payload:?}");
        if kind == 6 && flags & 1 == 1 {
            assert_eq!(payload, [1, 2, 3, 4, 5, 6, 7, 8]);
            break;
        }
    }
    drop((first, second));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_answers_cancelled_once_the_callers_deadline_has_passed() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // Entra answers in 20 s; the caller gives the broker 300 ms (grpc-timeout).
    h.fault(serde_json::json!({"route": "entra.token", "latency_ms": 20000, "count": 1}))
        .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    // A bare HTTP/2 client: tonic's would keep the deadline itself, and answer first.
    let mut send = bare_h2(&h, &leaf).await;
    let req = http::Request::post("https://localhost/tokenbroker.v1.TokenBroker/GetToken")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(graph_request())
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), send.send_request(req))
        .await
        .expect("an answer before Entra's")
        .unwrap();
    // A trailers-only answer: CANCELLED, as tonic's server answers a passed deadline.
    assert_eq!(answer.headers()["grpc-status"], "1", "{answer:?}");
    assert_eq!(answer.headers()["grpc-message"], "Timeout%20expired");
    // The handler ran: its record and count only, not a second one for a call dropped
    // before its handler ran.
    let series = r#"tokenbroker_requests_total{code="DEADLINE_EXCEEDED",method="GetToken",outcome="error"} 1"#;
    let metrics = h.metrics().await;
    assert!(metrics.contains(series), "{series} not in {metrics}");
    let r = h.stop_and_records().await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].outcome.name(), "cancelled", "{r:?}");
    assert!(
        r[0].reason
            .as_deref()
            .is_some_and(|r| r.ends_with("before the answer")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_before_its_request_is_read_is_audited_and_counted() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    // HEADERS with a 300 ms deadline, then never the body: the handler never starts.
    for rpc in ["GetToken", "WatchToken"] {
        let mut send = bare_h2(&h, &leaf).await;
        let req = http::Request::post(format!(
            "https://localhost/tokenbroker.v1.TokenBroker/{rpc}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Stalled)
        .unwrap();
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(10), send.send_request(req))
                .await
                .expect("an answer once the deadline passed")
                .unwrap();
        assert_eq!(answer.headers()["grpc-status"], "1", "{answer:?}");
    }
    let metrics = h.metrics().await;
    for rpc in ["GetToken", "WatchToken"] {
        let series = format!(
            r#"tokenbroker_requests_total{{code="DEADLINE_EXCEEDED",method="{rpc}",outcome="error"}} 1"#
        );
        assert!(metrics.contains(&series), "{series} not in {metrics}");
    }
    let r = h.stop_and_records().await;
    assert_eq!(r.len(), 2, "one record for each call: {r:?}");
    for (record, rpc) in r.iter().zip(["GetToken", "WatchToken"]) {
        assert_eq!(record.rpc, rpc, "{record:?}");
        assert_eq!(record.outcome.name(), "cancelled", "{record:?}");
        assert_eq!(record.code, "CANCELLED", "{record:?}");
        assert_eq!(record.caller.as_deref(), Some(COLLECTOR), "{record:?}");
        assert!(!record.request_id.is_empty(), "{record:?}");
        let reason = record.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("deadline passed before the request was read"),
            "{record:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_client_certificate_is_accepted_and_its_spiffe_id_is_the_caller() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // The SPIFFE ID wins over the DNS name in the same certificate.
    let leaf = h.ca.client(&[COLLECTOR, "collector.example.org"]);
    handshake(&h, &h.server_ca_pem, Some(&leaf)).await.unwrap();
    let t = h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    assert_eq!(t.tenant_id, demo::CONTOSO_TENANT);
    let r = h.records();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].caller.as_deref(), Some(COLLECTOR));
    assert_eq!(
        serde_json::to_value(r[0].proof).unwrap(),
        serde_json::json!("mtls")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spiffe_id_the_dns_name_is_the_caller() {
    let h = Harness::start(Options {
        policy: grants(&[("dns:agent.example.org", "fabrikam", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&["Agent.Example.org"]);
    h.get(Some(&leaf), None, "fabrikam", &[GRAPH])
        .await
        .unwrap();
    assert_eq!(
        h.records()[0].caller.as_deref(),
        Some("dns:agent.example.org")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_two_spiffe_ids_or_no_name_names_no_caller() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let two =
        h.ca.client(&[COLLECTOR, "spiffe://example.org/ns/logs/sa/other"]);
    assert_status(
        h.get(Some(&two), None, "contoso", &[GRAPH]).await,
        Code::Unauthenticated,
        &["carries more than one SPIFFE ID"],
    );
    let nameless = h.ca.client(&[]);
    assert_status(
        h.get(Some(&nameless), None, "contoso", &[GRAPH]).await,
        Code::Unauthenticated,
        &["carries neither a SPIFFE ID (URI SAN) nor a DNS name"],
    );
    let r = h.stop_and_records().await;
    assert!(
        r.iter()
            .all(|r| r.caller.is_none() && r.token_fingerprint.is_none()),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_not_yet_valid_wrong_ca_and_wrong_or_no_usage_certificates_are_refused_at_the_handshake()
 {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let now = OffsetDateTime::now_utc();
    let client_auth = ExtendedKeyUsagePurpose::ClientAuth;
    let other_ca = Ca::new("someone else's CA");
    let cases = [
        (
            "expired",
            h.ca.client_with(
                &[COLLECTOR],
                client_auth.clone(),
                now - Duration::days(10),
                now - Duration::days(1),
            ),
            "CertificateExpired",
        ),
        (
            "not yet valid",
            h.ca.client_with(
                &[COLLECTOR],
                client_auth.clone(),
                now + Duration::days(1),
                now + Duration::days(10),
            ),
            "CertificateExpired",
        ),
        ("wrong CA", other_ca.client(&[COLLECTOR]), "UnknownCA"),
        (
            "server-only usage",
            h.ca.client_with(
                &[COLLECTOR],
                ExtendedKeyUsagePurpose::ServerAuth,
                now - Duration::hours(1),
                now + Duration::days(1),
            ),
            "UnsupportedCertificate",
        ),
        (
            "no extended key usage at all",
            h.ca.client_with(
                &[COLLECTOR],
                None,
                now - Duration::hours(1),
                now + Duration::days(1),
            ),
            "UnsupportedCertificate",
        ),
    ];
    for (what, leaf, alert) in &cases {
        let e = handshake(&h, &h.server_ca_pem, Some(leaf))
            .await
            .expect_err(what);
        assert!(e.contains("alert") && e.contains(alert), "{what}: {e}");
    }
    // Each counted by its reason.
    refusals_reach(
        &h,
        &[
            ("outside_validity", 2),
            ("unknown_issuer", 1),
            ("wrong_purpose", 2),
        ],
    )
    .await;
    for (what, leaf, _) in &cases {
        // Through tonic too: no RPC gets through.
        assert!(
            h.get(Some(leaf), None, "contoso", &[GRAPH]).await.is_err(),
            "{what}"
        );
    }
    assert!(
        h.records().is_empty(),
        "refused handshakes never reach the API: {:?}",
        h.records()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_refused_by_the_client_or_not_tls_at_all_are_counted_by_reason() {
    use tokio::net::TcpStream;
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    // A client that does not trust the broker's certificate ends the handshake with an
    // alert: on the broker's side, the one sign that its certificate is not trusted.
    let e = handshake(&h, &Ca::new("not the server's CA").pem(), Some(&leaf))
        .await
        .unwrap_err();
    assert!(
        e.contains("UnknownIssuer") || e.contains("unknown issuer"),
        "{e}"
    );
    // Plaintext HTTP/2 to the TLS port.
    let mut plain = TcpStream::connect(h.addr).await.unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        plain.read_to_end(&mut rest),
    )
    .await
    .expect("the broker closes a connection that does not speak TLS");
    // A connection closed before its handshake ended.
    drop(TcpStream::connect(h.addr).await.unwrap());
    refusals_reach(
        &h,
        &[("client_alert", 1), ("protocol", 1), ("connection_lost", 1)],
    )
    .await;
    // None of it stops a good caller.
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_is_refused_when_required_and_unauthenticated_when_optional() {
    let required = Harness::start(Options {
        client_cert: "required",
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let e = handshake(&required, &required.server_ca_pem, None)
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    refusals_reach(&required, &[("no_certificate", 1)]).await;
    let good = required.ca.client(&[COLLECTOR]);
    required
        .get(Some(&good), None, "contoso", &[GRAPH])
        .await
        .unwrap();
    required.stop().await;

    let optional = Harness::start(Options::default()).await;
    handshake(&optional, &optional.server_ca_pem, None)
        .await
        .unwrap();
    assert_status(
        optional.get(None, None, "contoso", &[GRAPH]).await,
        Code::Unauthenticated,
        &["client certificate", "Bearer"],
    );
    let r = optional.records();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].caller, None);
    assert_eq!(r[0].code, "UNAUTHENTICATED");
    optional.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    let h = Harness::start(Options::default()).await;
    let new_ca = Ca::new("next server CA");
    handshake(&h, &h.server_ca_pem, None).await.unwrap();
    assert!(handshake(&h, &new_ca.pem(), None).await.is_err());

    // A half-written rotation (new certificate, old key) is refused; the old pair keeps serving.
    let next = new_ca.server();
    std::fs::write(h.path("server.crt"), &next.cert_pem).unwrap();
    assert!(h.server_cert.reload_if_changed().is_err());
    handshake(&h, &h.server_ca_pem, None).await.unwrap();

    // So is an expired pair, which every client would refuse.
    let now = OffsetDateTime::now_utc();
    let expired = new_ca.server_valid(now - Duration::days(30), now - Duration::days(1));
    std::fs::write(h.path("server.crt"), &expired.cert_pem).unwrap();
    std::fs::write(h.path("server.key"), &expired.key_pem).unwrap();
    let e = h.server_cert.reload_if_changed().unwrap_err().to_string();
    assert!(e.contains("expired at"), "{e}");
    handshake(&h, &h.server_ca_pem, None).await.unwrap();

    std::fs::write(h.path("server.crt"), &next.cert_pem).unwrap();
    std::fs::write(h.path("server.key"), &next.key_pem).unwrap();
    assert!(h.server_cert.reload_if_changed().unwrap());
    handshake(&h, &new_ca.pem(), None).await.unwrap();
    assert!(handshake(&h, &h.server_ca_pem, None).await.is_err());
    h.stop().await;
}

/// Replaces the file at `path` with a FIFO: a read of it waits until a writer opens it and
/// ends when the writer closes it.
fn fifo_in_place_of(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

/// Lets a second reload finish if it can (bounded) while the first one's read is held: it
/// may instead wait for the first, and then the order is right whatever the time.
fn let_finish_if_it_can<T>(second: &std::thread::JoinHandle<T>) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !second.is_finished() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Two reloads of the server certificate at once (the watcher's look and a SIGHUP's): the
/// one that read its pair first must not install it over the newer pair the other installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_reload_never_installs_a_pair_older_than_the_one_in_force() {
    use std::io::Write;
    let h = Harness::start(Options {
        // Only the reloads below read the files.
        server: "reload_secs = 3600",
        ..Default::default()
    })
    .await;
    let older_ca = Ca::new("older server CA");
    let newer_ca = Ca::new("newer server CA");
    let (older, newer) = (older_ca.server(), newer_ca.server());
    // The first reload reads the older certificate, then waits on the key: a FIFO its
    // writer keeps open.
    std::fs::write(h.path("server.crt"), &older.cert_pem).unwrap();
    let key = h.path("server.key");
    fifo_in_place_of(&key);
    let first = std::thread::spawn({
        let cert = h.server_cert.clone();
        move || cert.reload_if_changed().map_err(|e| e.to_string())
    });
    let mut writer = std::fs::OpenOptions::new().write(true).open(&key).unwrap();
    // Meanwhile the newer pair is written and reloaded.
    for (name, pem) in [
        ("server.crt", &newer.cert_pem),
        ("server.key", &newer.key_pem),
    ] {
        let next = h.path(&format!("{name}.next"));
        std::fs::write(&next, pem).unwrap();
        std::fs::rename(&next, h.path(name)).unwrap();
    }
    let second = std::thread::spawn({
        let cert = h.server_cert.clone();
        move || cert.reload_if_changed().map_err(|e| e.to_string())
    });
    let_finish_if_it_can(&second);
    writer.write_all(older.key_pem.as_bytes()).unwrap();
    drop(writer);
    first.join().unwrap().unwrap();
    second.join().unwrap().unwrap();
    handshake(&h, &newer_ca.pem(), None).await.unwrap();
    assert!(handshake(&h, &older_ca.pem(), None).await.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificates_end_is_a_metric_that_follows_its_rotation() {
    let h = Harness::start(Options::default()).await;
    let days_left = || {
        let text = h.broker.flow().metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("tokenbroker_server_certificate_expiry_seconds "))
            .map(|v| v.parse::<f64>().unwrap() / 86_400.0)
            .unwrap_or_else(|| panic!("no server certificate series in\n{text}"))
    };
    // Serving (the series is read while the server serves).
    handshake(&h, &h.server_ca_pem, None).await.unwrap();
    // rcgen's default end: the year 4096.
    assert!(days_left() > 365.0 * 1000.0, "{}", days_left());
    let now = OffsetDateTime::now_utc();
    let next =
        h.ca.server_valid(now - Duration::days(1), now + Duration::days(10));
    std::fs::write(h.path("server.crt"), &next.cert_pem).unwrap();
    std::fs::write(h.path("server.key"), &next.key_pem).unwrap();
    assert!(h.server_cert.reload_if_changed().unwrap());
    let left = days_left();
    assert!((9.0..=10.0).contains(&left), "{left}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_server_certificate_renewal_shows_in_the_metrics_until_a_good_pair_loads() {
    // Looked at hourly: only the reloads below read the files, never half-written.
    let h = Harness::start(Options {
        server: "reload_secs = 3600",
        ..Default::default()
    })
    .await;
    let state = || async {
        let [refused, refusals] = h
            .metric_values([
                "tokenbroker_server_certificate_refused",
                "tokenbroker_server_certificate_reloads_refused_total",
            ])
            .await;
        (refused, refusals)
    };
    assert_eq!(state().await, (0, 0));

    // An expired renewal: refused, shown, counted once however often it is looked at.
    let now = OffsetDateTime::now_utc();
    let expired =
        h.ca.server_valid(now - Duration::days(30), now - Duration::days(1));
    expired.write(h.dir.path(), "server");
    h.listener_tls.reload_now(false);
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 1));
    handshake(&h, &h.server_ca_pem, None).await.unwrap();

    // Each other refused content is counted: not yet valid, a certificate with another
    // pair's key (a half-written rotation), no key.
    let early =
        h.ca.server_valid(now + Duration::days(1), now + Duration::days(90));
    early.write(h.dir.path(), "server");
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 2));
    let next_ca = Ca::new("next server CA");
    let next = next_ca.server();
    std::fs::write(h.path("server.crt"), &next.cert_pem).unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 3));
    std::fs::remove_file(h.path("server.key")).unwrap();
    h.listener_tls.reload_now(false);
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 4));

    // A good pair loads: nothing refused any more; the count stays.
    std::fs::write(h.path("server.key"), &next.key_pem).unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (0, 4));
    handshake(&h, &next_ca.pem(), None).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_trust_files_show_in_the_metrics_until_good_ones_load() {
    // Looked at hourly: only the reloads below read the files, never half-written.
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        client_cert: "required",
        crl: true,
        server: "reload_secs = 3600",
        ..Default::default()
    })
    .await;
    let state = || async {
        let [refused, refusals] = h
            .metric_values([
                "tokenbroker_client_trust_refused",
                "tokenbroker_client_trust_reloads_refused_total",
            ])
            .await;
        (refused, refusals)
    };
    assert_eq!(state().await, (0, 0));
    let caller = h.ca.client(&[COLLECTOR]);

    // A CA bundle with no certificate: refused, shown, counted once however often it is
    // looked at; the trust loaded before stays in force.
    let ca = std::fs::read(h.path("callers-ca.pem")).unwrap();
    std::fs::write(h.path("callers-ca.pem"), "not a certificate\n").unwrap();
    h.listener_tls.reload_now(false);
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 1));
    h.get(Some(&caller), None, "contoso", &[GRAPH])
        .await
        .unwrap();

    // The bundle in force written back: nothing refused; the count stays.
    std::fs::write(h.path("callers-ca.pem"), &ca).unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (0, 1));

    // Each other refused content is counted: a truncated revocation list, then none.
    std::fs::write(h.path("callers.crl"), "-----BEGIN X509 CRL-----\nAAAA\n").unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 2));
    std::fs::remove_file(h.path("callers.crl")).unwrap();
    h.listener_tls.reload_now(false);
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (1, 3));
    h.get(Some(&caller), None, "contoso", &[GRAPH])
        .await
        .unwrap();

    // A good new list loads: nothing refused any more, and it is in force.
    std::fs::write(h.path("callers.crl"), h.ca.crl(2, &[&caller])).unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (0, 3));
    assert!(
        handshake(&h, &h.server_ca_pem, Some(&caller))
            .await
            .unwrap_err()
            .contains("CertificateRevoked")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_proven_by_a_client_certificate_is_never_resumed() {
    // A resumed TLS session carries the client certificate of its first handshake without
    // checking it again: a certificate expired or revoked since would keep working through
    // chained resumptions. With client certificates every handshake is a full one.
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let cfg = client_config(&h.server_ca_pem, Some(&leaf));
    for _ in 0..3 {
        // The server's session tickets, if it sends any, come before its SETTINGS frame,
        // which `open_h2_with` has read.
        let conn = open_h2_with(&h, cfg.clone()).await.unwrap();
        assert_eq!(
            conn.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificates_are_refused_and_a_new_revocation_list_applies_without_a_restart()
 {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        client_cert: "required",
        crl: true,
        ..Default::default()
    })
    .await;
    let kept = h.ca.client(&[COLLECTOR]);
    let lost = h.ca.client(&[COLLECTOR]);
    handshake(&h, &h.server_ca_pem, Some(&kept)).await.unwrap();
    handshake(&h, &h.server_ca_pem, Some(&lost)).await.unwrap();
    // Connections each certificate opened before the revocation, and keeps open.
    let ask = || tokenbroker::proto::GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    };
    let mut kept_conn = h.client(Some(&kept)).await.unwrap();
    let mut lost_conn = h.client(Some(&lost)).await.unwrap();
    kept_conn.get_token(ask()).await.unwrap();
    lost_conn.get_token(ask()).await.unwrap();

    // The CA revokes one certificate; the broker picks the new list up without a restart.
    std::fs::write(h.path("callers.crl"), h.ca.crl(2, &[&lost])).unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    assert!(!h.listener_tls.reload_if_changed().unwrap(), "unchanged");
    let refused = handshake(&h, &h.server_ca_pem, Some(&lost))
        .await
        .unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    handshake(&h, &h.server_ca_pem, Some(&kept)).await.unwrap();
    h.get(Some(&kept), None, "contoso", &[GRAPH]).await.unwrap();
    // The revoked certificate's open connection gets no more tokens; the other's does.
    for _ in 0..2 {
        assert_status(
            lost_conn.get_token(ask()).await.map(|r| r.into_inner()),
            Code::Unauthenticated,
            &["no longer accepted", "Revoked", "connect again"],
        );
    }
    kept_conn.get_token(ask()).await.unwrap();
    assert!(
        h.records()
            .iter()
            .any(|r| r.code == "UNAUTHENTICATED" && r.caller.as_deref() == Some(COLLECTOR)),
        "the refusal is audited with the caller: {:?}",
        h.records()
    );

    // A broken list (a truncated download) is refused; the revocation stays in force.
    std::fs::write(h.path("callers.crl"), "-----BEGIN X509 CRL-----\nAAAA\n").unwrap();
    let e = h.listener_tls.reload_if_changed().unwrap_err().to_string();
    assert!(e.contains("callers.crl"), "{e}");
    assert!(handshake(&h, &h.server_ca_pem, Some(&lost)).await.is_err());
    // Whole PEM armour around something that is not a revocation list: told at its file,
    // not at the CA bundle.
    std::fs::write(
        h.path("callers.crl"),
        "-----BEGIN X509 CRL-----\nbm90IGEgcmV2b2NhdGlvbiBsaXN0\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let e = h.listener_tls.reload_if_changed().unwrap_err().to_string();
    assert!(
        e.starts_with("certificate revocation list ")
            && e.contains("callers.crl")
            && e.contains("not a revocation list the broker can use"),
        "{e}"
    );
    assert!(handshake(&h, &h.server_ca_pem, Some(&lost)).await.is_err());

    // A list from another CA covers nothing this CA issued: its certificates' status is
    // unknown, and they are refused rather than let through.
    let other = Ca::new("another CA");
    std::fs::write(h.path("callers.crl"), other.crl(1, &[])).unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    let unknown = handshake(&h, &h.server_ca_pem, Some(&kept))
        .await
        .unwrap_err();
    // rustls answers an unknown revocation status with the unknown-CA alert.
    assert!(unknown.contains("UnknownCA"), "{unknown}");
    h.stop().await;
}

/// A reload of the client trust files that read them before another reload read and
/// installed newer ones (the watcher's look and a SIGHUP's at once) must not install its
/// older read over them: a certificate the newer revocation list revokes would pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_reload_never_installs_a_read_older_than_the_trust_in_force() {
    use std::io::Write;
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        crl: true,
        // Only the reloads below read the files.
        server: "reload_secs = 3600",
        ..Default::default()
    })
    .await;
    let lost = h.ca.client(&[COLLECTOR]);
    let crl = h.path("callers.crl");
    // The first reload's read of the list is held open: a FIFO its writer keeps open.
    fifo_in_place_of(&crl);
    let first = std::thread::spawn({
        let tls = h.listener_tls.clone();
        move || tls.reload_if_changed().map_err(|e| e.to_string())
    });
    let mut writer = std::fs::OpenOptions::new().write(true).open(&crl).unwrap();
    writer.write_all(h.ca.crl(2, &[]).as_bytes()).unwrap();
    // Meanwhile the CA revokes the certificate, and the files are reloaded again.
    let newer = h.path("newer.crl");
    std::fs::write(&newer, h.ca.crl(3, &[&lost])).unwrap();
    std::fs::rename(&newer, &crl).unwrap();
    let second = std::thread::spawn({
        let tls = h.listener_tls.clone();
        move || tls.reload_if_changed().map_err(|e| e.to_string())
    });
    let_finish_if_it_can(&second);
    drop(writer);
    first.join().unwrap().unwrap();
    second.join().unwrap().unwrap();
    let refused = handshake(&h, &h.server_ca_pem, Some(&lost)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRevoked")),
        "{refused:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_ca_added_to_the_bundle_is_trusted_without_a_restart() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        client_cert: "required",
        ..Default::default()
    })
    .await;
    let next = Ca::new("next callers CA");
    let from_next = next.client(&[COLLECTOR]);
    assert!(
        handshake(&h, &h.server_ca_pem, Some(&from_next))
            .await
            .is_err()
    );
    // CA rotation: the bundle holds the old and the new CA for a while.
    std::fs::write(
        h.path("callers-ca.pem"),
        format!("{}{}", h.ca.pem(), next.pem()),
    )
    .unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    handshake(&h, &h.server_ca_pem, Some(&from_next))
        .await
        .unwrap();
    h.get(Some(&from_next), None, "contoso", &[GRAPH])
        .await
        .unwrap();
    handshake(&h, &h.server_ca_pem, Some(&h.ca.client(&[COLLECTOR])))
        .await
        .unwrap();
    h.stop().await;
}

const PROD_COLLECTOR: &str = "spiffe://prod.example/ns/logs/sa/collector";
const PARTNER_AGENT: &str = "spiffe://partner.example/ns/sync/sa/agent";
const ELSEWHERE: &str = "spiffe://elsewhere.example/ns/batch/sa/job";
const AGENT_DNS: &str = "agent.example.org";

/// Two federated trust domains, prod.example and partner.example, each with its own CA
/// (`server.trust_domain_ca_files`), beside the harness's CA as `client_ca_file` (or none),
/// with every identity the tests use granted: only the CA scoping refuses anything.
async fn federated(client_ca_file: bool, server: &'static str) -> (Harness, Ca, Ca) {
    let prod = Ca::new("prod.example CA");
    let partner = Ca::new("partner.example CA");
    let h = Harness::start(Options {
        policy: grants(&[
            (PROD_COLLECTOR, "contoso", GRAPH),
            (PARTNER_AGENT, "contoso", GRAPH),
            (ELSEWHERE, "contoso", GRAPH),
            (&format!("dns:{AGENT_DNS}"), "contoso", GRAPH),
        ]),
        client_ca_file,
        server,
        files: vec![
            ("prod-ca.pem", prod.pem()),
            ("partner-ca.pem", partner.pem()),
        ],
        ..Default::default()
    })
    .await;
    (h, prod, partner)
}

const FEDERATED: &str = "trust_domain_ca_files = { \"prod.example\" = \"prod-ca.pem\", \"partner.example\" = \"partner-ca.pem\" }";

/// The handshake's verdict on `leaf`, and whether a GetToken with it is served.
async fn accepted(h: &Harness, leaf: &Leaf) -> Result<(), String> {
    handshake(h, &h.server_ca_pem, Some(leaf)).await?;
    h.get(Some(leaf), None, "contoso", &[GRAPH])
        .await
        .map(drop)
        .map_err(|s| format!("handshake passed, GetToken refused: {s:?}"))
}

/// A handshake refused for the CA scoping: the certificate chains to a configured CA (so
/// it is not refused as UnknownCA), but not to one that vouches for its identity.
#[track_caller]
fn refused_out_of_scope(what: &str, verdict: Result<(), String>) {
    let e = verdict.expect_err(what);
    assert!(
        e.contains("alert") && e.contains("CertificateUnknown"),
        "{what}: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domains_ca_vouches_only_for_that_domains_spiffe_ids() {
    let (h, prod, partner) = federated(true, FEDERATED).await;
    // Each domain's CA for its own SPIFFE IDs.
    accepted(&h, &prod.client(&[PROD_COLLECTOR])).await.unwrap();
    accepted(&h, &partner.client(&[PARTNER_AGENT]))
        .await
        .unwrap();
    let callers: Vec<_> = h.records().into_iter().map(|r| r.caller).collect();
    assert_eq!(
        callers,
        [Some(PROD_COLLECTOR.into()), Some(PARTNER_AGENT.into())]
    );
    // The partner's CA naming a prod.example identity, granted as it is: refused at the
    // handshake, as is client_ca_file's CA naming it.
    let before = h.records().len();
    refused_out_of_scope(
        "partner CA, prod ID",
        accepted(&h, &partner.client(&[PROD_COLLECTOR])).await,
    );
    refused_out_of_scope(
        "client_ca_file's CA, prod ID",
        accepted(&h, &h.ca.client(&[PROD_COLLECTOR])).await,
    );
    // Written in upper case, the trust domain is still prod.example's.
    refused_out_of_scope(
        "partner CA, prod ID in upper case",
        accepted(
            &h,
            &partner.client(&["spiffe://PROD.EXAMPLE/ns/logs/sa/collector"]),
        )
        .await,
    );
    // DNS names and SPIFFE IDs of trust domains not listed: client_ca_file's CA alone.
    accepted(&h, &h.ca.client(&[AGENT_DNS])).await.unwrap();
    accepted(&h, &h.ca.client(&[ELSEWHERE])).await.unwrap();
    refused_out_of_scope(
        "prod CA, DNS name",
        accepted(&h, &prod.client(&[AGENT_DNS])).await,
    );
    refused_out_of_scope(
        "prod CA, unlisted domain",
        accepted(&h, &prod.client(&[ELSEWHERE])).await,
    );
    // A certificate from no configured CA is refused as before.
    let e = accepted(&h, &Ca::new("someone else's CA").client(&[PROD_COLLECTOR]))
        .await
        .unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");
    refusals_reach(&h, &[("not_vouched_for", 5), ("unknown_issuer", 1)]).await;
    let r = h.records();
    assert_eq!(
        r[before..]
            .iter()
            .map(|r| r.caller.clone())
            .collect::<Vec<_>>(),
        [
            Some(format!("dns:{AGENT_DNS}")),
            Some(ELSEWHERE.to_string())
        ],
        "refused handshakes never reach the API"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_ca_file_only_the_listed_trust_domains_can_authenticate() {
    let (h, prod, partner) = federated(false, FEDERATED).await;
    accepted(&h, &prod.client(&[PROD_COLLECTOR])).await.unwrap();
    accepted(&h, &partner.client(&[PARTNER_AGENT]))
        .await
        .unwrap();
    refused_out_of_scope(
        "partner CA, prod ID",
        accepted(&h, &partner.client(&[PROD_COLLECTOR])).await,
    );
    // No bundle vouches for a DNS name, a SPIFFE ID of another domain, or no name at all.
    for (what, leaf) in [
        ("DNS name", prod.client(&[AGENT_DNS])),
        ("unlisted domain", partner.client(&[ELSEWHERE])),
        ("no name", prod.client(&[])),
    ] {
        refused_out_of_scope(what, accepted(&h, &leaf).await);
    }
    // The harness's CA is in no bundle now.
    let e = accepted(&h, &h.ca.client(&[AGENT_DNS])).await.unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trust_domains_every_ca_of_client_ca_file_vouches_for_every_identity() {
    let other = Ca::new("second callers CA");
    let h = Harness::start(Options {
        policy: grants(&[
            (PROD_COLLECTOR, "contoso", GRAPH),
            (PARTNER_AGENT, "contoso", GRAPH),
            (&format!("dns:{AGENT_DNS}"), "contoso", GRAPH),
        ]),
        ..Default::default()
    })
    .await;
    std::fs::write(
        h.path("callers-ca.pem"),
        format!("{}{}", h.ca.pem(), other.pem()),
    )
    .unwrap();
    assert!(h.listener_tls.reload_if_changed().unwrap());
    for ca in [&h.ca, &other] {
        for id in [PROD_COLLECTOR, PARTNER_AGENT, AGENT_DNS] {
            accepted(&h, &ca.client(&[id])).await.unwrap();
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_trust_domain_bundle_applies_without_a_restart() {
    // Looked at hourly: only the reloads below read the files, never half-written.
    let (h, prod, partner) =
        federated(true, "reload_secs = 3600\ntrust_domain_ca_files = { \"prod.example\" = \"prod-ca.pem\", \"partner.example\" = \"partner-ca.pem\" }").await;
    let state = || async {
        let [refused, refusals] = h
            .metric_values([
                "tokenbroker_client_trust_refused",
                "tokenbroker_client_trust_reloads_refused_total",
            ])
            .await;
        (refused, refusals)
    };
    let next = Ca::new("next prod.example CA");
    let from_next = next.client(&[PROD_COLLECTOR]);
    let from_prod = prod.client(&[PROD_COLLECTOR]);
    // Not in any bundle yet.
    let e = accepted(&h, &from_next).await.unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");

    // The next CA in the partner's bundle: trusted for the partner's identities only.
    std::fs::write(
        h.path("partner-ca.pem"),
        format!("{}{}", partner.pem(), next.pem()),
    )
    .unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (0, 0));
    refused_out_of_scope("next CA, partner's bundle", accepted(&h, &from_next).await);
    accepted(&h, &next.client(&[PARTNER_AGENT])).await.unwrap();

    // Rotation in prod.example: its bundle holds the old and the next CA.
    std::fs::write(h.path("partner-ca.pem"), partner.pem()).unwrap();
    std::fs::write(
        h.path("prod-ca.pem"),
        format!("{}{}", prod.pem(), next.pem()),
    )
    .unwrap();
    h.listener_tls.reload_now(false);
    accepted(&h, &from_next).await.unwrap();
    accepted(&h, &from_prod).await.unwrap();
    refused_out_of_scope(
        "next CA, partner ID",
        accepted(&h, &next.client(&[PARTNER_AGENT])).await,
    );

    // A broken bundle is refused and shown; the bundles in force stay.
    std::fs::write(h.path("prod-ca.pem"), "not a certificate\n").unwrap();
    let e = h.listener_tls.reload_if_changed().unwrap_err().to_string();
    assert!(e.contains("prod-ca.pem"), "{e}");
    assert_eq!(state().await, (1, 1));
    accepted(&h, &from_next).await.unwrap();

    // The old CA retired: its certificates are refused at the next handshake.
    std::fs::write(h.path("prod-ca.pem"), next.pem()).unwrap();
    h.listener_tls.reload_now(false);
    assert_eq!(state().await, (0, 1));
    accepted(&h, &from_next).await.unwrap();
    let e = accepted(&h, &from_prod).await.unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped_and_an_idle_one_times_out() {
    use tokio::net::TcpStream;
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // 256 connections that never send a ClientHello hold every handshake slot (the accept
    // loop takes a slot per connection, in the order they arrive).
    let mut idle = Vec::new();
    for _ in 0..256 {
        idle.push(TcpStream::connect(h.addr).await.unwrap());
    }
    // One more is closed at once rather than held.
    let mut extra = TcpStream::connect(h.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut byte))
        .await
        .expect("closed at once, well before the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    refusals_reach(&h, &[("over_capacity", 1)]).await;
    // A held connection is closed when the handshake timeout (10 s) passes; then a real
    // client's handshake has room again.
    let read = tokio::time::timeout(std::time::Duration::from_secs(60), idle[0].read(&mut byte))
        .await
        .expect("an idle handshake is given up");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Every held connection times out, counted as such (none is still waiting once the
    // first has been given up, but a few may lag behind it).
    refusals_reach(&h, &[("over_capacity", 1), ("timed_out", 256)]).await;
    let leaf = h.ca.client(&[COLLECTOR]);
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    drop(idle);
    h.stop().await;
}

/// A read that never returns, as on a hung NFS or CSI mount: `path` becomes a FIFO, and
/// once a reader has opened it (the broker's file watcher), its write end is held open
/// without writing. Returns the write end and what the file held.
/// A read that never returns, as on a hung NFS or CSI mount: `path` becomes a FIFO, and
/// once a reader has opened it (the broker's file watcher), its write end is held open
/// without writing. Returns the write end and what the file held. Waits on this thread, not
/// the runtime's: a broker that regressed would stall the runtime's timers too.
#[cfg(target_os = "linux")]
fn hang_reads_of(path: &std::path::Path) -> (std::fs::File, Vec<u8>) {
    use std::os::unix::fs::OpenOptionsExt;
    // Linux's O_NONBLOCK: opening a FIFO's write end then fails until a reader has it open.
    const O_NONBLOCK: i32 = 0o4000;
    let text = std::fs::read(path).unwrap();
    fifo_in_place_of(path);
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(path)
        {
            Ok(w) => return (w, text),
            Err(_) if std::time::Instant::now() < give_up => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("the broker's watcher never opened {}: {e}", path.display()),
        }
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stuck_on_a_hung_mount_never_stall_the_broker() {
    use std::io::Write;
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        server: "reload_secs = 1",
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    // The policy watcher and the TLS watcher each stuck in a read (a worker each before).
    let mut stuck = Vec::new();
    for name in ["policy.toml", "server.crt"] {
        stuck.push(hang_reads_of(&h.path(name)));
    }
    // Asked from a runtime of its own, so that a stalled broker fails the test instead of
    // stalling it too.
    let endpoint = h.endpoint(Some(&leaf));
    let (tell, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            tokenbroker::proto::token_broker_client::TokenBrokerClient::new(channel)
                .get_token(tokenbroker::proto::GetTokenRequest {
                    tenant: "contoso".into(),
                    scopes: vec![GRAPH.into()],
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|s| s.to_string())
        });
        let _ = tell.send(r);
    });
    let served = answer.recv_timeout(std::time::Duration::from_secs(30));
    // The mounts recover: the files are regular again (the next looks read those), and
    // the reads under way finish.
    for ((mut writer, text), name) in stuck.into_iter().zip(["policy.toml", "server.crt"]) {
        let recovered = h.path(&format!("{name}.recovered"));
        std::fs::write(&recovered, &text).unwrap();
        std::fs::rename(&recovered, h.path(name)).unwrap();
        writer.write_all(&text).unwrap();
    }
    served
        .expect("the broker answers while its file reads hang")
        .unwrap();
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

/// A HEADERS block opening a gRPC call of `path`: each header a literal without indexing of
/// a new name (HPACK 0x00), every length under 127.
pub(crate) fn grpc_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    block
}

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_a_connections_concurrent_stream_limit_are_refused_and_the_others_served() {
    let h = Harness::start(Options {
        server: "max_concurrent_streams = 2",
        ..Default::default()
    })
    .await;
    let mut conn = open_h2(&h, &h.server_ca_pem, None).await.unwrap();
    // A client that ignores the limit the server's SETTINGS gave: three calls opened at once,
    // none of them sending its message yet.
    let block = grpc_headers("/tokenbroker.v1.TokenBroker/WatchToken");
    let mut out = frame(4, 1, 0, &[]);
    for id in [1, 3, 5] {
        out.extend(frame(1, 0x4, id, &block));
    }
    // The first two then end their requests (with no message: answered with a status).
    out.extend(frame(0, 0x1, 1, &[]));
    out.extend(frame(0, 0x1, 3, &[]));
    conn.write_all(&out).await.unwrap();
    let (mut refused, mut answered) = (Vec::new(), Vec::new());
    while answered.len() < 2 {
        let mut header = [0u8; 9];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_exact(&mut header),
        )
        .await
        .unwrap_or_else(|_| panic!("refused {refused:?}, answered {answered:?}"))
        .unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & !(1 << 31);
        match header[3] {
            // RST_STREAM: its error code.
            3 => refused.push((stream, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
            // HEADERS ending the stream: a trailers-only answer.
            1 if header[4] & 0x1 != 0 => answered.push(stream),
            _ => {}
        }
    }
    // REFUSED_STREAM (7): the client may retry it, as nothing of it was processed.
    assert_eq!(refused, [(5, 7)]);
    answered.sort();
    assert_eq!(answered, [1, 3]);
    drop(conn);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_they_are_read_are_audited_with_the_certificates_caller() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let mut send = bare_h2(&h, &leaf).await;
    // A message over the decoding limit (16 KiB by default), and one that is not protobuf.
    let bodies = [
        ("GetToken", framed(vec![b'a'; 20_000])),
        ("WatchToken", framed(vec![0x0a, 0x7f, b'x'])),
    ];
    for (rpc, body) in bodies {
        let req = http::Request::post(format!(
            "https://localhost/tokenbroker.v1.TokenBroker/{rpc}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
        let answer = send.send_request(req).await.unwrap();
        let status = answer.headers().get("grpc-status").cloned();
        assert!(status.is_some_and(|s| s != "0"), "{answer:?}");
    }
    // Every request is in the trail, with the connection's caller and the status answered.
    let records = h.records();
    assert_eq!(records.len(), 2, "{records:#?}");
    for (r, rpc) in records.iter().zip(["GetToken", "WatchToken"]) {
        assert_eq!(r.rpc, rpc, "{r:?}");
        assert_eq!(r.caller.as_deref(), Some(COLLECTOR), "{r:?}");
        assert_ne!(r.code, "OK", "{r:?}");
        assert!(r.token_fingerprint.is_none(), "{r:?}");
        assert!(r.reason.as_deref().is_some_and(|m| !m.is_empty()), "{r:?}");
        assert!(r.peer.is_some(), "{r:?}");
    }
    assert_eq!(records[0].code, "OUT_OF_RANGE", "{:?}", records[0]);
    // A content type other than gRPC's is not refused: tonic reads the message, and the
    // handler answers and audits it as any request.
    let message = prost::Message::encode_to_vec(&tokenbroker::proto::GetTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    });
    let req = http::Request::post("https://localhost/tokenbroker.v1.TokenBroker/GetToken")
        .header("content-type", "text/plain")
        .header("te", "trailers")
        .body(framed(message))
        .unwrap();
    let answer = send.send_request(req).await.unwrap();
    assert_eq!(answer.status(), 200, "{answer:?}");
    let records = h.records();
    assert_eq!(records.len(), 3, "{records:#?}");
    assert_eq!(records[2].outcome, tokenbroker::audit::Outcome::Allowed);
    assert_eq!(records[2].caller.as_deref(), Some(COLLECTOR));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_methods_the_broker_does_not_have_are_audited_but_health_and_reflection_are_not() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let mut send = bare_h2(&h, &leaf).await;
    // An empty message, framed.
    let empty = || String::from_utf8(vec![0u8; 5]).unwrap();
    let mut call = async |path: &str| {
        let req = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(empty())
            .unwrap();
        let answer = send.send_request(req).await.unwrap();
        answer
            .headers()
            .get("grpc-status")
            .map(|s| s.to_str().unwrap().to_owned())
    };
    // A caller probing the broker's service for methods it does not have.
    let probes = ["ListTenants", "GetTokens", "Admin"];
    for m in probes {
        let status = call(&format!("/tokenbroker.v1.TokenBroker/{m}")).await;
        assert_eq!(status.as_deref(), Some("12"), "{m}: UNIMPLEMENTED");
    }
    // The health and reflection services, known methods or not, are not audited.
    call("/grpc.health.v1.Health/Check").await;
    let status = call("/grpc.health.v1.Health/Probe").await;
    assert_eq!(status.as_deref(), Some("12"));
    let status = call("/grpc.reflection.v1.ServerReflection/Probe").await;
    assert_eq!(status.as_deref(), Some("12"));

    let records = h.stop_and_records().await;
    assert_eq!(requests_in(&records), probes.len() as u64, "{records:#?}");
    for r in &records {
        assert_eq!((r.rpc, r.code), ("unknown", "UNIMPLEMENTED"), "{r:?}");
        assert_eq!(r.caller.as_deref(), Some(COLLECTOR), "{r:?}");
        assert_eq!(r.outcome, tokenbroker::audit::Outcome::Failed, "{r:?}");
        assert!(r.peer.is_some(), "{r:?}");
    }
    // The first is written as it is, naming the method asked for; the rest are summarised.
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0].repeats, None);
    assert_eq!(
        records[0].reason.as_deref(),
        Some("no such method: tokenbroker.v1.TokenBroker/ListTenants")
    );
    assert_eq!(records[1].repeats, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_path_that_only_ends_in_a_known_methods_name_is_audited_as_unknown() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let mut send = bare_h2(&h, &leaf).await;
    // Routed to the broker's service (its name is the path's prefix), and no method of it.
    let req = http::Request::post("https://localhost/tokenbroker.v1.TokenBroker/Admin/GetToken")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(String::from_utf8(vec![0u8; 5]).unwrap())
        .unwrap();
    let answer = send.send_request(req).await.unwrap();
    assert_eq!(
        answer
            .headers()
            .get("grpc-status")
            .map(|s| s.to_str().unwrap()),
        Some("12")
    );
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        (records[0].rpc, records[0].code),
        ("unknown", "UNIMPLEMENTED")
    );
    assert_eq!(
        records[0].reason.as_deref(),
        Some("no such method: tokenbroker.v1.TokenBroker/Admin/GetToken")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_files_checked_at_start_are_the_ones_served() {
    // Replaced, broken, between the configuration's check and the listener's start: the
    // broker serves what it checked, and refuses the broken files as a reload would.
    let broken = "not PEM\n".to_string();
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        replaced_before_bind: vec![
            ("server.crt", broken.clone()),
            ("server.key", broken.clone()),
            ("callers-ca.pem", broken),
        ],
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let t = h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    assert!(!t.access_token.is_empty());
    h.stop().await;
}

/// A bare HTTP/2 client over TLS with `leaf`'s certificate: tonic's would check and frame
/// what these tests send wrong on purpose, or keep a deadline itself.
pub(crate) async fn bare_h2<B>(
    h: &Harness,
    leaf: &Leaf,
) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&h.server_ca_pem, Some(leaf)))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// A request body that never comes: a client whose request stalls after its HEADERS.
pub(crate) struct Stalled;

impl http_body::Body for Stalled {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// `message` as a gRPC call's body: uncompressed, its length, the message (all ASCII in
/// these tests, which a String body carries).
pub(crate) fn framed(message: Vec<u8>) -> String {
    let mut body = vec![0u8];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    String::from_utf8(body).unwrap()
}

/// A GetToken call's body asking for contoso's Graph token.
pub(crate) fn graph_request() -> String {
    framed(prost::Message::encode_to_vec(
        &tokenbroker::proto::GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        },
    ))
}
