use tonic::Code;

use crate::harness::*;

const A: &str = "spiffe://example.org/ns/a/sa/reader";
const B: &str = "spiffe://example.org/ns/b/sa/other";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_gets_exactly_what_it_is_granted_and_denials_do_not_reveal_tenants() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (B, "fabrikam", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();

    let other_tenant = assert_status(
        h.get(Some(&a), None, "fabrikam", &[GRAPH]).await,
        Code::PermissionDenied,
        &["not granted"],
    );
    let other_scope = assert_status(
        h.get(Some(&a), None, "contoso", &[CONTOSO_API]).await,
        Code::PermissionDenied,
        &[],
    );
    let extra_scope = assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH, CONTOSO_API])
            .await,
        Code::PermissionDenied,
        &[],
    );
    let unknown_tenant = assert_status(
        h.get(Some(&a), None, "no-such-tenant", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    // Forbidden known tenant and unknown tenant look the same to the caller.
    for s in [&other_scope, &extra_scope, &unknown_tenant] {
        assert_eq!(s.message(), other_tenant.message());
    }
    assert!(!unknown_tenant.message().contains("no-such-tenant"));
    assert!(!other_tenant.message().contains("fabrikam"));
    let metadata = |s: &tonic::Status| {
        let mut keys: Vec<String> = s
            .metadata()
            .keys()
            .map(|k| format!("{k:?}"))
            .filter(|k| !k.contains("x-request-id"))
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(metadata(&unknown_tenant), metadata(&other_tenant));

    // A malformed request is still the caller's to fix, whatever it is granted.
    assert_status(
        h.get(Some(&a), None, "contoso", &["has space"]).await,
        Code::InvalidArgument,
        &["scopes"],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_names_the_identity_it_was_decided_for() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    // The certificate is granted, but a bearer token on the same request names the caller.
    let s = assert_status(
        h.get(
            Some(&a),
            Some(&h.issuer.token("svc-a")),
            "contoso",
            &[GRAPH],
        )
        .await,
        Code::PermissionDenied,
        &["not granted", "`jwt:test:svc-a`"],
    );
    assert!(!s.message().contains(A), "{s:?}");
    // The same words for a tenant that does not exist.
    let unknown = assert_status(
        h.get(
            Some(&a),
            Some(&h.issuer.token("svc-a")),
            "no-such",
            &[GRAPH],
        )
        .await,
        Code::PermissionDenied,
        &[],
    );
    assert_eq!(unknown.message(), s.message());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_file_is_refused_and_the_old_policy_stays_in_force() {
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();

    for (broken, why) in [
        ("[[grant]\ncallers = ", "unclosed array table"),
        (
            "[[grant]]\ncallers = [\"spiffe://example.org/ns/a/sa/reader\"]\ntenants = [\"nope\"]\nscopes = [\"x\"]\n",
            "grant[0].tenants: `nope` is not a configured tenant",
        ),
        (
            "[[grant]]\ncallers = [\"everyone\"]\ntenants = [\"contoso\"]\nscopes = [\"x\"]\n",
            "grant[0].callers: `everyone`: a caller is",
        ),
    ] {
        let e = h.set_policy(broken).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid policy ") && e.contains("policy.toml: ") && e.contains(why),
            "{e}"
        );
        h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    }

    // A valid new policy takes effect at once.
    assert!(h.set_policy(&grants(&[(A, "fabrikam", GRAPH)])).unwrap());
    assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    h.get(Some(&a), None, "fabrikam", &[GRAPH]).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_path_patterns_grant_a_whole_namespace() {
    let h = Harness::start(Options {
        policy: grants(&[("spiffe://example.org/ns/a/*", "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let inside = h.ca.client(&["spiffe://example.org/ns/a/sa/any"]);
    let outside = h.ca.client(&["spiffe://example.org/ns/ab/sa/any"]);
    h.get(Some(&inside), None, "contoso", &[GRAPH])
        .await
        .unwrap();
    assert_status(
        h.get(Some(&outside), None, "contoso", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_ends_a_watch_at_the_next_token() {
    use tokenbroker::proto::{GetTokenRequest, WatchTokenRequest};
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (B, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let mut watch = h
        .client(Some(&a))
        .await
        .unwrap()
        .watch_token(WatchTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(first.token.is_some());

    h.set_policy(&grants(&[(B, "contoso", GRAPH)])).unwrap();
    // B forces a new token; A's watch sees the revocation instead of the token.
    let b = h.ca.client(&[B]);
    h.client(Some(&b))
        .await
        .unwrap()
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            force_refresh: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let end = watch.message().await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_file_and_the_server_certificate_at_once() {
    // The files are looked at hourly here: only the signal can make the changes take effect.
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH)]),
        server: "reload_secs = 3600",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    h.get(Some(&a), None, "contoso", &[GRAPH]).await.unwrap();
    std::fs::write(h.path("policy.toml"), grants(&[(A, "fabrikam", GRAPH)])).unwrap();
    assert_status(
        h.get(Some(&a), None, "fabrikam", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );
    // A handler of this process's own, so the signal can never take the default action
    // (ending the test binary) whatever the broker's watcher has done yet.
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hangup();
    let mut allowed = false;
    for _ in 0..200 {
        if h.get(Some(&a), None, "fabrikam", &[GRAPH]).await.is_ok() {
            allowed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(allowed, "the policy changed at SIGHUP");
    assert_status(
        h.get(Some(&a), None, "contoso", &[GRAPH]).await,
        Code::PermissionDenied,
        &[],
    );

    // A rotated server certificate is served at the next SIGHUP too.
    let next_ca = crate::pki::Ca::new("next server CA");
    let next = next_ca.server();
    std::fs::write(h.path("server.crt"), &next.cert_pem).unwrap();
    std::fs::write(h.path("server.key"), &next.key_pem).unwrap();
    hangup();
    let mut rotated = false;
    for _ in 0..200 {
        if crate::mtls::handshake(&h, &next_ca.pem(), None)
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new server certificate is served after SIGHUP");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ended_by_a_revoked_grant_frees_its_place_among_the_callers_watches() {
    use tokenbroker::proto::{GetTokenRequest, WatchTokenRequest};
    let h = Harness::start(Options {
        policy: grants(&[(A, "contoso", GRAPH), (B, "contoso", GRAPH)]),
        limits: "max_watches_per_caller = 1",
        ..Default::default()
    })
    .await;
    let a = h.ca.client(&[A]);
    let mut client = h.client(Some(&a)).await.unwrap();
    let req = || WatchTokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
    };
    let mut watch = client.watch_token(req()).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().unwrap().token.is_some());
    h.set_policy(&grants(&[(B, "contoso", GRAPH)])).unwrap();
    let b = h.ca.client(&[B]);
    h.client(Some(&b))
        .await
        .unwrap()
        .get_token(GetTokenRequest {
            tenant: "contoso".into(),
            scopes: vec![GRAPH.into()],
            force_refresh: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        watch.message().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Granted again, A opens a watch: the ended one (its stream still held by the client)
    // no longer counts.
    h.set_policy(&grants(&[(A, "contoso", GRAPH), (B, "contoso", GRAPH)]))
        .unwrap();
    let mut again = client.watch_token(req()).await.unwrap().into_inner();
    assert!(again.message().await.unwrap().unwrap().token.is_some());
    drop(watch);
    h.stop().await;
}
