use std::time::Duration;

use tokenbroker::cli::{CallerAuth, token};
use tokenbroker::proto::GetTokenRequest;

use crate::harness::*;

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

    let by_bearer = token(
        &addr,
        req("fabrikam"),
        Duration::from_secs(30),
        &CallerAuth {
            ca: Some(h.path("server-ca.pem")),
            cert: None,
            bearer_file: Some(h.path("bearer.jwt")),
        },
    )
    .await
    .unwrap();
    assert_eq!(by_bearer.tenant_id, demo::FABRIKAM_TENANT);

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
    assert!(none.contains("Unauthenticated"), "{none}");

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
