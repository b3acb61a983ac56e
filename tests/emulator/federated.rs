//! Federated identity credentials whose issuer is an external OpenID issuer (a Kubernetes
//! cluster's, as AKS workload identity uses): the emulated Entra fetches the issuer's keys
//! and checks the service account token as Entra does.

use std::time::Duration;

use serde_json::Value;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::emulator::config::{FederatedCredentialConfig, demo};

use crate::cluster_issuer::{Behaviour, ClusterIssuer, EC_KID, RSA_KID, SERVICE_ACCOUNT};
use crate::common::*;

const SCOPE: &str = "https://graph.microsoft.com/.default";

/// The demo with the Fabrikam app trusting `issuer`'s service account `SERVICE_ACCOUNT`.
fn trusting(issuer: &str) -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config.tenants[1].apps[0].federated_credentials = vec![FederatedCredentialConfig {
        issuer: issuer.into(),
        subject: SERVICE_ACCOUNT.into(),
        audience: "api://AzureADTokenExchange".into(),
    }];
    config
}

async fn exchange(env: &Env, token: &str) -> (u16, Value) {
    env.exchange_assertion(demo::FABRIKAM_TENANT, demo::FABRIKAM_APP, SCOPE, token)
        .await
}

fn description(body: &Value) -> &str {
    body["error_description"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_service_account_token_of_a_trusted_cluster_is_exchanged_and_checked_as_entra_does() {
    let cluster = ClusterIssuer::start().await;
    let env = start(trusting(cluster.issuer())).await;

    // RS256, as a cluster signs: a token of the app.
    let (s, body) = exchange(&env, &cluster.token(SERVICE_ACCOUNT)).await;
    assert_eq!(s, 200, "{body}");
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["appid"], demo::FABRIKAM_APP);
    assert_eq!(c["tid"], demo::FABRIKAM_TENANT);
    // ES256 verifies too.
    let (s, body) = exchange(
        &env,
        &cluster.sign(EC_KID, &cluster.claims(SERVICE_ACCOUNT)),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // The keys were fetched once and kept.
    assert_eq!(cluster.jwks_fetches(), 1);

    // A signature the published key does not make: 700027.
    let (s, body) = exchange(
        &env,
        &cluster.sign_unpublished(RSA_KID, &cluster.claims(SERVICE_ACCOUNT)),
    )
    .await;
    assert_eq!((s, aadsts(&body)), (401, 700027), "{body}");
    assert_eq!(body["error"], "invalid_client");
    // A payload changed after signing: 700027.
    let good = cluster.token(SERVICE_ACCOUNT);
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut forged = cluster.claims("system:serviceaccount:kube-system:admin");
    forged["exp"] = (now() + 7200).into();
    parts[1] = b64url(forged.to_string().as_bytes());
    let (s, body) = exchange(&env, &parts.join(".")).await;
    assert_eq!((s, aadsts(&body)), (401, 700027), "{body}");
    // A key the issuer does not publish: 7000272, naming the issuer.
    let (s, body) = exchange(
        &env,
        &cluster.sign_unpublished("rotated-away", &cluster.claims(SERVICE_ACCOUNT)),
    )
    .await;
    assert_eq!((s, aadsts(&body)), (401, 7000272), "{body}");
    assert!(description(&body).contains(cluster.issuer()), "{body}");

    // Expired (beyond the 5 minutes of skew): 700024.
    let mut expired = cluster.claims(SERVICE_ACCOUNT);
    expired["exp"] = (now() - 600).into();
    let (s, body) = exchange(&env, &cluster.sign(RSA_KID, &expired)).await;
    assert_eq!((s, aadsts(&body)), (401, 700024), "{body}");
    // Another audience: 700212.
    let mut other = cluster.claims(SERVICE_ACCOUNT);
    other["aud"] = "https://kubernetes.default.svc".into();
    let (s, body) = exchange(&env, &cluster.sign(RSA_KID, &other)).await;
    assert_eq!((s, aadsts(&body)), (401, 700212), "{body}");
    // Another service account: 700213; the same one in other case: 7002138 (Entra compares
    // subjects case-sensitively, and says so when case alone differs).
    for (subject, code) in [
        ("system:serviceaccount:tokenbroker:other", 700213),
        ("system:serviceaccount:TokenBroker:tokenbroker", 7002138),
    ] {
        let (s, body) = exchange(&env, &cluster.token(subject)).await;
        assert_eq!((s, aadsts(&body)), (401, code), "{subject}: {body}");
        assert!(description(&body).contains(subject), "{body}");
        assert_eq!(
            description(&body).contains(
                "The subject matches with case-insensitive comparison, but not with case-sensitive comparison."
            ),
            code == 7002138,
            "{body}"
        );
    }
    // The Contoso app trusts no cluster: 700211, and its issuer is never asked.
    let fetches = cluster.jwks_fetches();
    let (s, body) = env
        .exchange_assertion(
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
            SCOPE,
            &cluster.token(SERVICE_ACCOUNT),
        )
        .await;
    assert_eq!((s, aadsts(&body)), (401, 700211), "{body}");
    assert!(description(&body).contains(cluster.issuer()), "{body}");
    assert_eq!(cluster.jwks_fetches(), fetches);
}

#[tokio::test]
async fn an_unknown_issuer_is_700211_and_is_never_fetched() {
    let trusted = ClusterIssuer::start().await;
    let stranger = ClusterIssuer::start().await;
    let env = start(trusting(trusted.issuer())).await;
    let (s, body) = exchange(&env, &stranger.token(SERVICE_ACCOUNT)).await;
    assert_eq!((s, aadsts(&body)), (401, 700211), "{body}");
    assert!(description(&body).contains(stranger.issuer()), "{body}");
    assert_eq!(stranger.jwks_fetches(), 0);
    // The trusted issuer's URL without its trailing slash is another issuer.
    let mut claims = trusted.claims(SERVICE_ACCOUNT);
    claims["iss"] = trusted.issuer().trim_end_matches('/').into();
    let (s, body) = exchange(&env, &trusted.sign(RSA_KID, &claims)).await;
    assert_eq!((s, aadsts(&body)), (401, 700211), "{body}");
    assert_eq!(trusted.jwks_fetches(), 0);
}

#[tokio::test]
async fn an_issuer_that_cannot_be_reached_or_does_not_answer_is_an_entra_error() {
    // A port with nothing listening, and one that accepts and never answers.
    let closed = tokenbroker::bench::free_port().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let cluster = ClusterIssuer::start().await;
    for issuer in [
        format!("http://{closed}/cluster/"),
        format!("http://{silent_addr}/cluster/"),
    ] {
        let env = start(trusting(&issuer)).await;
        let mut claims = cluster.claims(SERVICE_ACCOUNT);
        claims["iss"] = issuer.clone().into();
        let (s, body) = exchange(&env, &cluster.sign(RSA_KID, &claims)).await;
        assert_eq!((s, aadsts(&body)), (401, 7000272), "{issuer}: {body}");
        let d = description(&body);
        assert!(d.contains("could not be retrieved"), "{d}");
        assert!(d.contains(&issuer), "{d}");
    }
    held.abort();
}

#[tokio::test]
async fn concurrent_assertions_naming_one_issuer_share_one_fetch() {
    const N: u64 = 8;
    // The issuer holds its discovery document, so every assertion arrives while the first
    // fetch is under way.
    let cluster = ClusterIssuer::start_with(Behaviour {
        held: true,
        ..Behaviour::default()
    })
    .await;
    let env = start(trusting(cluster.issuer())).await;
    let token = cluster.token(SERVICE_ACCOUNT);
    let exchanges = futures::future::join_all((0..N).map(|_| exchange(&env, &token)));
    let release = async {
        // Each assertion that fetched for itself would be seen here at once; merged, they
        // are not, and after a moment the issuer answers the one fetch.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while cluster.discovery_fetches() < N {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        cluster.release();
    };
    let (answers, ()) = tokio::join!(exchanges, release);
    for (s, body) in answers {
        assert_eq!(s, 200, "{body}");
    }
    assert_eq!(cluster.discovery_fetches(), 1);
    assert_eq!(cluster.jwks_fetches(), 1);
}

#[tokio::test]
async fn an_issuer_that_failed_is_not_asked_again_at_once() {
    let cluster = ClusterIssuer::start_with(Behaviour {
        unavailable: true,
        ..Behaviour::default()
    })
    .await;
    let env = start(trusting(cluster.issuer())).await;
    let token = cluster.token(SERVICE_ACCOUNT);
    let (s, first) = exchange(&env, &token).await;
    assert_eq!((s, aadsts(&first)), (401, 7000272), "{first}");
    assert!(description(&first).contains("HTTP 503"), "{first}");
    assert_eq!(cluster.discovery_fetches(), 1);
    // The failure is the answer for a while: the same error, and the issuer is not asked.
    let (s, second) = exchange(&env, &token).await;
    assert_eq!((s, aadsts(&second)), (401, 7000272), "{second}");
    assert!(description(&second).contains("HTTP 503"), "{second}");
    assert_eq!(cluster.discovery_fetches(), 1);
    // A reset forgets it.
    let (s, _) = env.admin(reqwest::Method::POST, "/reset", None).await;
    assert_eq!(s, 204);
    let _ = exchange(&env, &token).await;
    assert_eq!(cluster.discovery_fetches(), 2);
}

#[tokio::test]
async fn an_oversized_jwks_is_refused() {
    let cluster = ClusterIssuer::start_with(Behaviour {
        jwks_padding: 300 * 1024,
        ..Behaviour::default()
    })
    .await;
    let env = start(trusting(cluster.issuer())).await;
    let (s, body) = exchange(&env, &cluster.token(SERVICE_ACCOUNT)).await;
    assert_eq!((s, aadsts(&body)), (401, 7000272), "{body}");
    let d = description(&body);
    assert!(d.contains("could not be retrieved"), "{d}");
    assert!(d.contains("larger than 256 KiB"), "{d}");
}

#[tokio::test]
async fn an_issuer_that_is_not_https_nor_loopback_is_refused_at_start() {
    let e = EmulatorConfig::from_toml_str(
        r#"
[[tenants]]
tenant_id = "c0c0c0c0-0000-4000-8000-00000000c001"

[[tenants.apps]]
client_id = "c0c0c0c0-a990-4000-8000-000000000a01"
federated_credentials = [
  { issuer = "http://oidc.cluster.example/", subject = "system:serviceaccount:a:b" },
]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("http only on a loopback host"), "{e}");
}
