use std::path::PathBuf;
use std::time::Duration;

use tokenbroker::cli::{CallerAuth, request_token, token};
use tokenbroker::proto::GetTokenRequest;

use crate::harness::*;
use crate::pki::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_speaks_mtls_and_bearer() {
    let mtls_caller = "spiffe://example.org/ns/cli/sa/script";
    let h = Harness::start(Options {
        policy: grants(&[
            (mtls_caller, "contoso", GRAPH),
            ("jwt:test:script", "fabrikam", GRAPH),
        ]),
        ..Default::default()
    })
    .await;
    let (cert, key) = h.ca.client(&[mtls_caller]).write(h.dir.path(), "script");
    std::fs::write(h.path("server-ca.pem"), &h.server_ca_pem).unwrap();
    std::fs::write(
        h.path("bearer.jwt"),
        format!("{}\n", h.issuer.token("script")),
    )
    .unwrap();
    let addr = format!("https://localhost:{}", h.addr.port());
    let req = |tenant: &str| GetTokenRequest {
        tenant: tenant.into(),
        scopes: vec![GRAPH.into()],
        ..Default::default()
    };

    let by_cert = token(
        &addr,
        req("contoso"),
        Duration::from_secs(30),
        &CallerAuth {
            ca: Some(h.path("server-ca.pem")),
            cert: Some((cert, key)),
            bearer_file: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(by_cert.tenant_id, demo::CONTOSO_TENANT);

    // By a bearer token in a file: the token alone, or the header's whole value.
    std::fs::write(
        h.path("header.txt"),
        format!("bearer {}\n", h.issuer.token("script")),
    )
    .unwrap();
    for file in ["bearer.jwt", "header.txt"] {
        let by_bearer = token(
            &addr,
            req("fabrikam"),
            Duration::from_secs(30),
            &CallerAuth {
                ca: Some(h.path("server-ca.pem")),
                cert: None,
                bearer_file: Some(h.path(file)),
            },
        )
        .await
        .unwrap();
        assert_eq!(by_bearer.tenant_id, demo::FABRIKAM_TENANT, "{file}");
    }

    let none = token(
        &addr,
        req("contoso"),
        Duration::from_secs(30),
        &CallerAuth {
            ca: Some(h.path("server-ca.pem")),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(none.starts_with("UNAUTHENTICATED: "), "{none}");

    // A bearer token is never sent in the clear off loopback.
    let e = token(
        "http://192.0.2.1:50051",
        req("contoso"),
        Duration::from_secs(1),
        &CallerAuth {
            bearer_file: Some(h.path("bearer.jwt")),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(e.contains("plaintext"), "{e}");
    h.stop().await;
}

/// `tokenbroker token`'s own mistakes against a TLS listener: each failure says what is wrong
/// on the caller's side, and its exit status whether to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_says_what_the_caller_got_wrong() {
    let caller = "spiffe://example.org/ns/cli/sa/script";
    let h = Harness::start(Options {
        policy: grants(&[(caller, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let (cert, key) = h.ca.client(&[caller]).write(h.dir.path(), "script");
    std::fs::write(h.path("server-ca.pem"), &h.server_ca_pem).unwrap();
    std::fs::write(h.path("other-ca.pem"), Ca::new("another CA").pem()).unwrap();
    let addr = format!("https://localhost:{}", h.addr.port());
    let attempt = async |addr: &str, ca: &str, cert: Option<(&PathBuf, &PathBuf)>| {
        request_token(
            addr,
            GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            },
            Duration::from_secs(30),
            &CallerAuth {
                ca: Some(h.path(ca)),
                cert: cert.map(|(c, k)| (c.clone(), k.clone())),
                bearer_file: None,
            },
        )
        .await
    };

    // A --ca that does not hold the broker's CA: asking for --ca would not help.
    let e = attempt(&addr, "other-ca.pem", Some((&cert, &key)))
        .await
        .unwrap_err();
    assert!(
        e.message.contains("not issued by a CA in --ca") && e.message.contains("other-ca.pem"),
        "{}",
        e.message
    );
    assert_eq!(e.exit, 1, "{}", e.message);

    // Certificates the broker's TLS refuses: the broker's reason (its alert), told the same
    // way on every run (TLS 1.3 refuses a client certificate after the client has sent its
    // request, so the call alone sometimes sees only a closed connection), and 77.
    let other_ca = Ca::new("another CA");
    let foreign = other_ca.client(&[caller]).write(h.dir.path(), "foreign");
    let now = time::OffsetDateTime::now_utc();
    let no_usage =
        h.ca.client_with(
            &[caller],
            None,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .write(h.dir.path(), "no-usage");
    for _ in 0..5 {
        let e = attempt(&addr, "server-ca.pem", Some((&foreign.0, &foreign.1)))
            .await
            .unwrap_err();
        assert_eq!(e.exit, 77, "{}", e.message);
        assert!(
            e.message.contains("received fatal alert: UnknownCA")
                && e.message
                    .contains("does not trust the CA that issued the client certificate"),
            "{}",
            e.message
        );
        let e = attempt(&addr, "server-ca.pem", Some((&no_usage.0, &no_usage.1)))
            .await
            .unwrap_err();
        assert_eq!(e.exit, 77, "{}", e.message);
        assert!(
            e.message.contains("UnsupportedCertificate") && e.message.contains("clientAuth"),
            "{}",
            e.message
        );
    }

    // The same without --ca, the broker trusted through the platform's roots (here
    // SSL_CERT_FILE, in a process of its own): the refusal is read again just the same.
    for _ in 0..5 {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
            .args([
                "token", "--addr", &addr, "--tenant", "contoso", "--scope", GRAPH,
            ])
            .arg("--cert")
            .arg(&foreign.0)
            .arg("--key")
            .arg(&foreign.1)
            .env("SSL_CERT_FILE", h.path("server-ca.pem"))
            .env_remove("SSL_CERT_DIR")
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{said}");
        assert!(said.contains("received fatal alert: UnknownCA"), "{said}");
    }

    // http:// to the TLS listener: the call fails differently from run to run (a broken
    // pipe, a closed connection, a bad HTTP/2 frame); the message and exit status do not.
    for _ in 0..5 {
        let e = request_token(
            &format!("http://localhost:{}", h.addr.port()),
            GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            },
            Duration::from_secs(30),
            &CallerAuth::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit, 1, "{}", e.message);
        assert!(
            e.message
                .contains("serves TLS there: try an https:// --addr"),
            "{}",
            e.message
        );
    }

    attempt(&addr, "server-ca.pem", Some((&cert, &key)))
        .await
        .unwrap();
    h.stop().await;

    // A listener that requires a client certificate, asked without one.
    let h = Harness::start(Options {
        client_cert: "required",
        ..Default::default()
    })
    .await;
    std::fs::write(h.path("server-ca.pem"), &h.server_ca_pem).unwrap();
    let addr = format!("https://localhost:{}", h.addr.port());
    let e = request_token(
        &addr,
        GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        },
        Duration::from_secs(30),
        &CallerAuth {
            ca: Some(h.path("server-ca.pem")),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit, 77, "{}", e.message);
    assert!(
        e.message.contains("CertificateRequired") && e.message.contains("pass --cert and --key"),
        "{}",
        e.message
    );
    h.stop().await;
}

/// A broker certificate `token` refuses (expired, not valid yet) is a mistake to fix where
/// the broker runs: exit 1, not "worth retrying", with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_does_not_call_an_expired_broker_certificate_worth_retrying() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    for (leaf, words) in [
        (
            ca.server_valid(now - 30 * day, now - day),
            "must be renewed",
        ),
        (ca.server_valid(now + day, now + 30 * day), "not valid yet"),
    ] {
        let addr = tls_listener(&leaf).await;
        let e = request_token(
            &format!("https://localhost:{}", addr.port()),
            GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            },
            Duration::from_secs(30),
            &CallerAuth {
                ca: Some(dir.path().join("ca.pem")),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit, 1, "{}", e.message);
        assert!(e.message.contains(words), "{}", e.message);
    }
}

/// A TLS listener on loopback that presents `leaf` and serves nothing.
async fn tls_listener(leaf: &crate::pki::Leaf) -> std::net::SocketAddr {
    let acceptor = tls_acceptor(leaf);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_calls_a_server_that_waits_for_the_client_to_speak_first() {
    use tokio::io::AsyncReadExt;
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("proxy CA");
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let acceptor = tls_acceptor(&ca.server());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Says nothing until the client has (as some proxies do), then answers every call
    // NOT_FOUND.
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (mut r, w) = tokio::io::split(tls);
            let mut heard = vec![0u8; 1024];
            let Ok(n @ 1..) = r.read(&mut heard).await else {
                continue;
            };
            heard.truncate(n);
            let io = tokio::io::join(std::io::Cursor::new(heard).chain(r), w);
            let answer = hyper::service::service_fn(|_| async {
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "quiet")
                    .body(String::new())
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(io), answer),
            );
        }
    });
    let e = request_token(
        &format!("https://localhost:{}", addr.port()),
        GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            ..Default::default()
        },
        Duration::from_secs(30),
        &CallerAuth {
            ca: Some(dir.path().join("ca.pem")),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(e.message.contains("quiet"), "{}", e.message);
    assert_eq!(e.exit, 1, "{}", e.message);
}

/// A TLS acceptor presenting `leaf`, asking for no client certificate.
fn tls_acceptor(leaf: &crate::pki::Leaf) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_at_the_handshake_costs_the_broker_one_handshake() {
    const TRIES: u64 = 20;
    let caller = "spiffe://example.org/ns/cli/sa/script";
    let h = Harness::start(Options {
        policy: grants(&[(caller, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    std::fs::write(h.path("server-ca.pem"), &h.server_ca_pem).unwrap();
    let (cert, key) = Ca::new("another CA")
        .client(&[caller])
        .write(h.dir.path(), "foreign");
    let addr = format!("https://localhost:{}", h.addr.port());
    for _ in 0..TRIES {
        let e = request_token(
            &addr,
            GetTokenRequest {
                tenant: "contoso".into(),
                scopes: vec![GRAPH.into()],
                ..Default::default()
            },
            Duration::from_secs(30),
            &CallerAuth {
                ca: Some(h.path("server-ca.pem")),
                cert: Some((cert.clone(), key.clone())),
                bearer_file: None,
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit, 77, "{}", e.message);
        assert!(
            e.message.contains("received fatal alert: UnknownCA"),
            "{}",
            e.message
        );
    }
    // Each run is one refused handshake (one line in the broker's log), not a second one
    // made only to read the broker's reason again.
    let refused = || {
        h.listener_tls
            .handshakes_refused()
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while refused() < TRIES && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused(), TRIES);
    h.stop().await;
}
