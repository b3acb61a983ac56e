use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true

[cloud]
name = "custom"
authority_host = "https://127.0.0.1:8443"

[apps.shared]
client_id = "11111111-1111-1111-1111-111111111111"
credential = { type = "key_vault_certificate", vault_url = "https://v.vault.azure.net", certificate = "shared-app" }

[tenants.contoso]
tenant_id = "22222222-2222-2222-2222-222222222222"
client_id = "33333333-3333-3333-3333-333333333333"
credential = { type = "key_vault_certificate", vault_url = "https://v.vault.azure.net", certificate = "contoso-app", algorithm = "PS256", thumbprint = "x5t_s256" }

[tenants.fabrikam]
tenant_id = "fabrikam.onmicrosoft.com"
app = "shared"

[tenants.northwind]
tenant_id = "44444444-4444-4444-4444-444444444444"
app = "shared"
"#;

fn problems(text: &str) -> Vec<Problem> {
    match Config::from_toml_str(text, Path::new("/"), &no_env) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn accepts_per_tenant_apps_and_a_shared_multi_tenant_app() {
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.tenants.len(), 3);
    let contoso = &c.tenants["contoso"];
    assert_eq!(contoso.client_id, "33333333-3333-3333-3333-333333333333");
    assert!(matches!(
        contoso.credential,
        Credential::KeyVaultCertificate {
            algorithm: SigningAlgorithm::PS256,
            thumbprint: ThumbprintHeader::X5tS256,
            ..
        }
    ));
    // One multi-tenant app consented in two tenants.
    assert_eq!(
        c.tenants["fabrikam"].client_id,
        c.tenants["northwind"].client_id
    );
    assert_eq!(c.tenants["fabrikam"].tenant_id, "fabrikam.onmicrosoft.com");
    assert_eq!(c.cloud.authority_host().as_str(), "https://127.0.0.1:8443/");
    assert_eq!(c.cache.refresh_fraction, 0.5);
}

#[test]
fn rejects_secret_looking_fields_with_their_location() {
    let text = format!(
        "{GOOD}\n[tenants.evil]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\nclient_secret = \"abc\"\n"
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.evil.client_secret");
    assert!(
        p[0].message.contains("holds no secrets"),
        "{}",
        p[0].message
    );
    assert_eq!(
        p[0].line,
        Some(
            text.lines()
                .position(|l| l.starts_with("client_secret"))
                .unwrap()
                + 1
        )
    );
}

#[test]
fn rejects_private_key_material_in_any_value() {
    // A fake PEM header, assembled at run time so the repository holds no key-shaped text.
    let pem_header = format!("-----BEGIN {} KEY-----", "PRIVATE");
    let text = GOOD.replace(
        "certificate = \"shared-app\"",
        &format!("certificate = \"{pem_header}\\nMII\""),
    );
    let p = problems(&text);
    assert!(p.iter().any(|p| p.message.contains("no secrets")), "{p:?}");
}

#[test]
fn an_entra_client_secret_is_refused_wherever_it_is_put_and_never_repeated() {
    // Assembled at run time so the repository holds no secret-shaped text: the shape of the
    // value the portal shows once when a client secret is added.
    let secret = format!("Ab{}8{}~{}", "c", "Q", "dEfGhIjKlMnOpQrStUvWxYz0123456789.");
    // Pasted for the client id, the field beside it in the portal.
    let text = GOOD.replace(
        "client_id = \"33333333-3333-3333-3333-333333333333\"",
        &format!("client_id = \"{secret}\""),
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.contoso.client_id");
    assert!(p[0].message.contains("client secret"), "{}", p[0].message);
    assert!(
        !ConfigError::Invalid(p).to_string().contains(&secret),
        "the secret is not repeated"
    );
    // From the environment too.
    let env = |k: &str| (k == "TOKENBROKER_IDENTITY_CLIENT_ID").then(|| secret.clone());
    let e = Config::from_toml_str(GOOD, Path::new("/"), &env).unwrap_err();
    let shown = e.to_string();
    assert!(shown.contains("TOKENBROKER_IDENTITY_CLIENT_ID"), "{shown}");
    assert!(shown.contains("client secret"), "{shown}");
    assert!(
        !shown.contains(&secret),
        "the secret is not repeated: {shown}"
    );
}

#[test]
fn reports_every_problem_not_just_the_first() {
    let text = r#"
[server]
listen = "0.0.0.0:50051"
plaintext = true
[tenants.a]
tenant_id = "not a tenant"
client_id = "nope"
credential = { type = "key_vault_certificate", vault_url = "http://v.vault.azure.net", certificate = "c" }
"#;
    let p = problems(text);
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"server.plaintext"), "{paths:?}");
    assert!(paths.contains(&"tenants.a.tenant_id"), "{paths:?}");
    assert!(paths.contains(&"tenants.a.client_id"), "{paths:?}");
    assert!(
        paths.contains(&"tenants.a.credential.vault_url"),
        "{paths:?}"
    );
    let rendered = ConfigError::Invalid(p).to_string();
    assert!(
        rendered.contains("line 6: tenants.a.tenant_id"),
        "{rendered}"
    );
}

#[test]
fn syntax_errors_carry_a_line() {
    let p = problems("[server\nlisten = 1");
    assert_eq!(p[0].path, "<file>");
    assert_eq!(p[0].line, Some(1));
}

#[test]
fn unknown_fields_are_refused() {
    let p = problems(&GOOD.replace("plaintext = true", "plaintext = true\nlisten_port = 3"));
    assert!(p[0].message.contains("listen_port"), "{p:?}");
}

#[test]
fn environment_overrides_deployment_settings() {
    let env = |k: &str| match k {
        "TOKENBROKER_LISTEN" => Some("127.0.0.2:6000".to_string()),
        "TOKENBROKER_LOG_FORMAT" => Some("json".to_string()),
        "TOKENBROKER_IDENTITY_CLIENT_ID" => {
            Some("66666666-6666-6666-6666-666666666666".to_string())
        }
        _ => None,
    };
    let c = Config::from_toml_str(GOOD, Path::new("/"), &env).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.2:6000");
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(
        c.identity.client_id.as_deref(),
        Some("66666666-6666-6666-6666-666666666666")
    );
}

#[test]
fn a_tenant_referencing_a_missing_app_is_explained() {
    let p = problems(&GOOD.replace(
        "app = \"shared\"\n\n[tenants.northwind]",
        "app = \"nope\"\n\n[tenants.northwind]",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.fabrikam.app");
    assert!(p[0].message.contains("[apps.nope]"));
}

#[test]
fn a_tenant_referencing_an_invalid_app_is_not_told_the_app_is_missing() {
    // Both fabrikam and northwind use the shared app; its own problem is the only one.
    let p = problems(&GOOD.replace(
        "client_id = \"11111111-1111-1111-1111-111111111111\"",
        "client_id = \"<multi-tenant app client id>\"",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "apps.shared.client_id", "{p:?}");
    assert!(p[0].message.contains("is not a GUID"), "{p:?}");
}

#[test]
fn imds_override_must_be_loopback() {
    let p = problems(&format!(
        "{GOOD}\n[identity]\nimds_endpoint = \"http://10.0.0.1\"\n"
    ));
    assert_eq!(p[0].path, "identity.imds_endpoint");
}

/// GOOD served over TLS instead of plaintext (the files need not exist to be validated).
fn tls(extra: &str) -> String {
    format!(
        "{}\n{extra}",
        GOOD.replace(
            "listen = \"127.0.0.1:50051\"\nplaintext = true",
            "listen = \"0.0.0.0:50051\"\ntls_cert_file = \"/tls/tls.crt\"\ntls_key_file = \"/tls/tls.key\""
        )
    )
}

#[test]
fn callers_policy_audit_and_limits_are_read() {
    let text = format!(
        "{GOOD}\n[callers]\ndev_loopback = true\naudience = \"api://tokenbroker\"\n\
         [callers.issuers.k8s]\nissuer = \"https://oidc.example/c1\"\nalgorithms = [\"RS256\", \"ES256\"]\n\
         [[policy.grant]]\ncallers = [\"spiffe://td/ns/a/*\", \"jwt:k8s:system:serviceaccount:a:b\"]\n\
         tenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n\
         [audit]\noutput = \"file\"\nfile = \"audit.jsonl\"\n\
         [limits]\ncaller_rate_per_sec = 5.0\ncaller_burst = 10\n"
    );
    // The audit file's directory must exist.
    let dir = tempfile::tempdir().unwrap();
    let c = Config::from_toml_str(&text, dir.path(), &no_env).unwrap();
    let k8s = &c.callers.issuers["k8s"];
    assert_eq!(
        k8s.discovery_url.as_str(),
        "https://oidc.example/c1/.well-known/openid-configuration"
    );
    assert_eq!(k8s.audiences, vec!["api://tokenbroker".to_string()]);
    assert_eq!(k8s.identity_claim, "sub");
    assert!(c.callers.dev_loopback);
    let PolicyConfig::Inline(p) = &c.policy else {
        panic!("{:?}", c.policy)
    };
    assert!(p.allows(
        "spiffe://td/ns/a/sa/x",
        "contoso",
        &["https://graph.microsoft.com/.default".into()]
    ));
    assert_eq!(
        c.audit.output,
        AuditOutput::File(dir.path().join("audit.jsonl"))
    );
    assert_eq!(c.limits.caller_burst, 10);
    // Failed bearer tokens are limited per address by default.
    assert_eq!(c.limits.failed_auth_per_sec, 1.0);
    assert_eq!(c.limits.failed_auth_burst, 20);
    // Verified bearer tokens are remembered by default.
    assert_eq!(c.callers.remember, crate::config::RememberConfig::default());
    assert!(!c.callers.remember.is_off());
}

#[test]
fn remembering_verified_tokens_can_be_sized_or_turned_off_within_bounds() {
    let read = |extra: &str| {
        Config::from_toml_str(
            &format!(
                "{GOOD}
[callers]
{extra}
"
            ),
            Path::new("/var/tb"),
            &no_env,
        )
        .unwrap()
        .callers
        .remember
    };
    let r = read("remember_tokens = 50000\nremember_secs = 60");
    assert_eq!((r.tokens, r.max_age), (50_000, Duration::from_secs(60)));
    assert!(read("remember_tokens = 0").is_off());
    assert!(read("remember_secs = 0").is_off());
    let p = problems(&format!(
        "{GOOD}
[callers]
remember_tokens = 5000000
remember_secs = 86400
"
    ));
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["callers.remember_tokens", "callers.remember_secs"],
        "{p:?}"
    );
    assert!(p[1].message.contains("0 turns the memory off"), "{p:?}");
}

#[test]
fn the_failed_authentication_limit_can_be_turned_off_but_not_made_nonsense() {
    let c = Config::from_toml_str(
        &format!(
            "{GOOD}
[limits]
failed_auth_per_sec = 0.0
"
        ),
        Path::new("/var/tb"),
        &no_env,
    )
    .unwrap();
    assert!(crate::limits::failed_auth(&c.limits).is_none());
    let p = problems(&format!(
        "{GOOD}
[limits]
failed_auth_per_sec = -1.0
failed_auth_burst = 0
"
    ));
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"limits.failed_auth_per_sec"), "{p:?}");
    assert!(paths.contains(&"limits.failed_auth_burst"), "{p:?}");
}

#[test]
fn rates_too_small_to_wait_for_are_refused_naming_the_field() {
    let p = problems(&format!(
        "{GOOD}
[limits]
caller_rate_per_sec = 1e-300
failed_auth_per_sec = 1e-300
"
    ));
    for field in ["limits.caller_rate_per_sec", "limits.failed_auth_per_sec"] {
        let found = p.iter().find(|p| p.path == field);
        assert!(
            found.is_some_and(|p| p.message.contains("at least 0.001")),
            "{field}: {p:?}"
        );
    }
    // The smallest rate allowed is fine.
    let c = Config::from_toml_str(
        &format!(
            "{GOOD}
[limits]
caller_rate_per_sec = 0.001
failed_auth_per_sec = 0.001
"
        ),
        Path::new("/var/tb"),
        &no_env,
    )
    .unwrap();
    assert_eq!(c.limits.caller_rate_per_sec, 0.001);
}

#[test]
fn the_dev_caller_is_refused_with_tls_or_off_loopback() {
    let dev = "[callers]\ndev_loopback = true\n";
    let p = problems(&tls(dev));
    assert!(p.iter().any(|p| p.path == "callers.dev_loopback"), "{p:?}");
    let everywhere = format!("{GOOD}{dev}").replace("127.0.0.1:50051", "0.0.0.0:50051");
    let p = problems(&everywhere);
    assert!(p.iter().any(|p| p.path == "callers.dev_loopback"), "{p:?}");
    // Plaintext on loopback is where it belongs.
    let c = Config::from_toml_str(&format!("{GOOD}{dev}"), Path::new("/"), &no_env).unwrap();
    assert!(c.callers.dev_loopback);
    // An address from the environment is named as such: the file says loopback.
    let env = |k: &str| (k == "TOKENBROKER_LISTEN").then(|| "0.0.0.0:50051".to_string());
    let Err(ConfigError::Invalid(p)) =
        Config::from_toml_str(&format!("{GOOD}{dev}"), Path::new("/"), &env)
    else {
        panic!("accepted")
    };
    let dev = p.iter().find(|p| p.path == "callers.dev_loopback");
    assert!(
        dev.is_some_and(|p| p
            .message
            .ends_with("here: plaintext, listen 0.0.0.0:50051 (from TOKENBROKER_LISTEN)")),
        "{p:?}"
    );
}

#[test]
fn issuers_refuse_hmac_and_none_and_need_an_audience() {
    let p = problems(&format!(
        "{GOOD}\n[callers.issuers.x]\nissuer = \"https://i.example\"\nalgorithms = [\"HS256\", \"none\"]\n"
    ));
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"callers.issuers.x.algorithms"), "{p:?}");
    assert!(paths.contains(&"callers.issuers.x.audience"), "{p:?}");
    assert!(p.iter().any(|p| p.message.contains("HS256")), "{p:?}");
    // A list of refused algorithms is refused for what it names, once per name; only an
    // empty one is told that it needs one.
    let algorithms = |list: &str| {
        problems(&format!(
            "{GOOD}\n[callers]\naudience = \"a\"\n[callers.issuers.x]\nissuer = \"https://i.example\"\nalgorithms = {list}\n"
        ))
        .into_iter()
        .map(|p| (p.path, p.message))
        .collect::<Vec<_>>()
    };
    let p = algorithms("[\"HS256\"]");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].1.starts_with("`HS256` is not allowed"), "{p:?}");
    let p = algorithms("[]");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "callers.issuers.x.algorithms", "{p:?}");
    assert!(
        p[0].1.contains("at least one algorithm is required"),
        "{p:?}"
    );
    let p = problems(&format!(
        "{GOOD}\n[callers]\naudience = \"a\"\n[callers.issuers.x]\nissuer = \"http://issuer.example\"\n"
    ));
    assert_eq!(p[0].path, "callers.issuers.x.issuer", "{p:?}");
}

#[test]
fn mutual_tls_needs_tls_and_a_ca_to_require_certificates() {
    let p = problems(&GOOD.replace(
        "plaintext = true",
        "plaintext = true\nclient_ca_file = \"/etc/ca.pem\"",
    ));
    assert!(
        p.iter()
            .any(|p| p.path == "server.client_ca_file" && p.message.contains("needs TLS")),
        "{p:?}"
    );
    let p = problems(&tls("").replace(
        "tls_key_file = \"/tls/tls.key\"",
        "tls_key_file = \"/tls/tls.key\"\nclient_cert = \"required\"",
    ));
    assert!(p.iter().any(|p| p.path == "server.client_cert"), "{p:?}");
}

#[test]
fn trust_domain_names_are_spiffe_trust_domains_and_their_bundles_must_exist() {
    let long = format!("{}.example", "a".repeat(248));
    let cases = [
        (
            "spiffe://prod.example",
            "has a scheme: name the trust domain alone, as in `prod.example`",
        ),
        ("spiffe:prod.example", "has a scheme"),
        (
            "prod.example:8443",
            "has a port: name the trust domain alone, as in `prod.example`",
        ),
        (
            "prod.example/ns/a",
            "has a path: name the trust domain alone, as in `prod.example`",
        ),
        (
            "Prod.Example",
            "has upper-case letters: SPIFFE trust domain names are lower case (`prod.example`)",
        ),
        (
            "prod example",
            "has ' ': a SPIFFE trust domain name holds only lower-case letters, digits, `.`, `-` and `_`",
        ),
        ("", "a trust domain name cannot be empty"),
        (
            long.as_str(),
            "is 256 bytes long: a SPIFFE trust domain name is at most 255",
        ),
    ];
    for (name, why) in cases {
        let key = format!("server.trust_domain_ca_files.\"{name}\"");
        let p = problems(&trust_domains(&format!("\"{name}\" = \"/nowhere/ca.pem\"")));
        assert!(
            p.iter().any(|p| p.path == key && p.message.contains(why)),
            "{name}: {p:?}"
        );
    }
    // Good names; the files are checked, each named by its trust domain.
    let p = problems(&trust_domains(
        "\"prod.example\" = \"/nowhere/prod-ca.pem\"\n\"partner-1_x.example\" = \"partner.pem\"",
    ));
    let at = |key: &str| {
        p.iter()
            .filter(|p| p.path == key)
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        at("server.trust_domain_ca_files.\"prod.example\""),
        ["/nowhere/prod-ca.pem does not exist or is not a file"],
        "{p:?}"
    );
    // A relative path resolves as the other paths do, beside the configuration file.
    assert_eq!(
        at("server.trust_domain_ca_files.\"partner-1_x.example\""),
        ["/partner.pem does not exist or is not a file"],
        "{p:?}"
    );
}

/// `tls()` with a `[server.trust_domain_ca_files]` table of `entries`.
fn trust_domains(entries: &str) -> String {
    tls("").replacen(
        "\n[cloud]",
        &format!("\n[server.trust_domain_ca_files]\n{entries}\n\n[cloud]"),
        1,
    )
}

#[test]
fn trust_domain_bundles_alone_turn_mutual_tls_on() {
    let dir = tls_files("prod-ca.pem");
    let config = |table: &str, extra: &str, grant: &str| {
        format!(
            "{}\n[[policy.grant]]\ncallers = [{grant}]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
            GOOD.replace(
                "listen = \"127.0.0.1:50051\"\nplaintext = true",
                &format!(
                    "listen = \"0.0.0.0:50051\"\ntls_cert_file = \"tls.crt\"\ntls_key_file = \"tls.key\"\n{extra}\n[server.trust_domain_ca_files]\n{table}\n"
                ),
            )
        )
    };
    let load = |text: &str| Config::from_toml_str(text, dir.path(), &no_env);
    let prod = "\"prod.example\" = \"prod-ca.pem\"";
    let c = load(&config(
        prod,
        "client_cert = \"required\"",
        "\"spiffe://prod.example/ns/a/sa/x\"",
    ))
    .unwrap();
    assert!(c.server.mutual_tls());
    let tls = c.server.tls.as_ref().unwrap();
    assert_eq!(tls.client_ca_file, None);
    assert_eq!(
        tls.trust_domain_ca_files["prod.example"],
        dir.path().join("prod-ca.pem")
    );
    assert_eq!(tls.client_cert, ClientCertMode::Required);
    // Callers can authenticate, and the granted SPIFFE ID can: nothing to warn of.
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // Only client_ca_file vouches for DNS names and SPIFFE IDs of domains not listed: with
    // none, grants to them are warned of as never usable.
    let c = load(&config(
        prod,
        "",
        "\"dns:svc.example.org\", \"spiffe://partner.example/ns/b/*\"",
    ))
    .unwrap();
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter().any(
            |w| w.contains("`dns:svc.example.org` can never authenticate")
                && w.contains("only a CA of server.client_ca_file vouches for DNS names")
        ),
        "{w:?}"
    );
    assert!(
        w.iter().any(
            |w| w.contains("`spiffe://partner.example/ns/b/*` can never authenticate")
                && w.contains(
                    "trust domain `partner.example` is not in server.trust_domain_ca_files"
                )
        ),
        "{w:?}"
    );
    // With a client_ca_file, it vouches for them.
    std::fs::copy(
        dir.path().join("prod-ca.pem"),
        dir.path().join("callers-ca.pem"),
    )
    .unwrap();
    let c = load(&config(
        prod,
        "client_ca_file = \"callers-ca.pem\"",
        "\"dns:svc.example.org\", \"spiffe://partner.example/ns/b/*\"",
    ))
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // A bundle with no certificate is found as serve would find it, named by its domain.
    let paths = |r: Result<Config, ConfigError>| match r {
        Err(ConfigError::Invalid(p)) => p
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect::<Vec<_>>(),
        other => panic!("expected problems, got {other:?}"),
    };
    let p = paths(load(&config(
        "\"prod.example\" = \"prod-ca.pem\"\n\"partner.example\" = \"garbage.pem\"",
        "",
        "\"spiffe://prod.example/ns/a/sa/x\"",
    )));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "server.trust_domain_ca_files.\"partner.example\"");
    assert!(
        p[0].1.contains("garbage.pem") && p[0].1.contains("no PEM certificate found"),
        "{p:?}"
    );

    // Mutual TLS needs TLS, the table alone as client_ca_file alone.
    let p = problems(&GOOD.replace(
        "plaintext = true",
        "plaintext = true\n[server.trust_domain_ca_files]\n\"prod.example\" = \"/etc/prod-ca.pem\"",
    ));
    assert!(
        p.iter().any(|p| p.path == "server.trust_domain_ca_files"
            && p.message.contains("mutual TLS needs TLS")),
        "{p:?}"
    );
}

#[test]
fn revocation_lists_need_a_client_ca_and_must_exist() {
    let p = problems(&tls("").replace(
        "tls_key_file = \"/tls/tls.key\"",
        "tls_key_file = \"/tls/tls.key\"\nclient_crl_files = [\"/nowhere/callers.crl\"]",
    ));
    let crl: Vec<_> = p
        .iter()
        .filter(|p| p.path == "server.client_crl_files")
        .collect();
    assert!(
        crl.iter().any(|p| p.message.contains("set client_ca_file")),
        "{p:?}"
    );
    assert!(
        crl.iter()
            .any(|p| p.message.contains("/nowhere/callers.crl does not exist")),
        "{p:?}"
    );
}

#[test]
fn wildcard_grants_and_unknown_tenants_are_refused() {
    for (grant, why) in [
        (
            "callers = [\"dns:a\"]\ntenants = [\"*\"]\nscopes = [\"s\"]",
            "`*` is accepted only alone and only in a grant to `dev:loopback`",
        ),
        (
            "callers = [\"dns:a\"]\ntenants = [\"nowhere\"]\nscopes = [\"s\"]",
            "`nowhere` is not a configured tenant",
        ),
    ] {
        let p = problems(&format!("{GOOD}\n[[policy.grant]]\n{grant}\n"));
        assert!(
            p.iter().all(|p| p.path == "policy.grant[0].tenants"),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.message.contains(why)), "{p:?}");
    }
}

#[test]
fn admin_and_telemetry_default_and_validate() {
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert!(c.telemetry.otlp_endpoint.is_none());
    assert_eq!(c.telemetry.sampling_ratio, 1.0);
    assert_eq!(c.telemetry.service_name, "tokenbroker");

    let text = format!(
        "{GOOD}\n[admin]\nlisten = \"0.0.0.0:9090\"\n\n[telemetry]\notlp_endpoint = \"http://collector:4318\"\nsampling_ratio = 0.25\nservice_name = \"tb\"\n"
    );
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.admin.listen, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(
        c.telemetry.otlp_endpoint.as_ref().map(Url::as_str),
        Some("http://collector:4318/")
    );
    assert_eq!(c.telemetry.sampling_ratio, 0.25);
    assert_eq!(c.telemetry.service_name, "tb");

    let env = |k: &str| match k {
        "TOKENBROKER_ADMIN_LISTEN" => Some("127.0.0.1:19090".to_string()),
        "TOKENBROKER_OTLP_ENDPOINT" => Some("https://otel.example:4318".to_string()),
        _ => None,
    };
    let c = Config::from_toml_str(GOOD, Path::new("/"), &env).unwrap();
    assert_eq!(c.admin.listen.port(), 19090);
    assert!(c.telemetry.otlp_endpoint.is_some());

    let bad = format!(
        "{GOOD}\n[admin]\nlisten = \"nine\"\n\n[telemetry]\notlp_endpoint = \"collector:4318\"\nsampling_ratio = 2.0\n"
    );
    let paths: Vec<String> = problems(&bad).into_iter().map(|p| p.path).collect();
    for want in [
        "admin.listen",
        "telemetry.otlp_endpoint",
        "telemetry.sampling_ratio",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} in {paths:?}");
    }
}

#[test]
fn a_managed_identity_credential_takes_the_clouds_exchange_audience_by_default() {
    let fic = r#"
[tenants.federated]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "managed_identity", client_id = "77777777-7777-7777-7777-777777777777" }
"#;
    let c = Config::from_toml_str(&format!("{GOOD}{fic}"), Path::new("/"), &no_env).unwrap();
    assert_eq!(
        c.tenants["federated"].credential,
        Credential::ManagedIdentity {
            client_id: "77777777-7777-7777-7777-777777777777".into(),
            audience: "api://AzureADTokenExchange".into(),
        }
    );
    assert!(
        c.summary().contains("federated credential"),
        "{}",
        c.summary()
    );
    let us_gov = GOOD.replace(
        "name = \"custom\"\nauthority_host = \"https://127.0.0.1:8443\"",
        "name = \"us_gov\"",
    );
    let c = Config::from_toml_str(&format!("{us_gov}{fic}"), Path::new("/"), &no_env).unwrap();
    assert!(matches!(
        &c.tenants["federated"].credential,
        Credential::ManagedIdentity { audience, .. } if audience == "api://AzureADTokenExchangeUSGov"
    ));
}

#[test]
fn a_managed_identity_credential_is_explained_when_incomplete_or_mixed() {
    let bad = r#"
[tenants.federated]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "managed_identity", certificate = "app", audience = "api://x y" }

[tenants.mixed]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "key_vault_certificate", vault_url = "https://v.vault.azure.net", certificate = "app", client_id = "77777777-7777-7777-7777-777777777777" }

[tenants.typo]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "managed-identity", client_id = "77777777-7777-7777-7777-777777777777" }
"#;
    let p = problems(&format!("{GOOD}{bad}"));
    let at = |path: &str| {
        p.iter()
            .find(|p| p.path == path)
            .map(|p| p.message.clone())
            .unwrap_or_else(|| panic!("no problem at {path}: {p:?}"))
    };
    assert!(
        at("tenants.federated.credential.certificate").contains("not used by a `managed_identity`")
    );
    assert!(at("tenants.federated.credential.audience").contains("api://AzureADTokenExchange"));
    assert!(
        at("tenants.mixed.credential.client_id").contains("not used by a `key_vault_certificate`")
    );
    assert!(at("tenants.typo.credential.type").contains("`managed_identity`"));
    let p2 = problems(&format!(
        "{GOOD}\n[tenants.nocid]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\nclient_id = \"66666666-6666-6666-6666-666666666666\"\ncredential = {{ type = \"managed_identity\" }}\n"
    ));
    assert!(
        p2.iter()
            .any(|p| p.path == "tenants.nocid.credential.client_id"
                && p.message.contains("user-assigned")),
        "{p2:?}"
    );
}

#[test]
fn files_elsewhere_checks_everything_but_the_named_files_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace(
        "[apps.shared]",
        "[outbound]\nextra_ca_file = \"/mounted/corp-ca.pem\"\n\n[apps.shared]",
    ) + "\n[policy]\nfile = \"/mounted/policy.toml\"\n";
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, &text).unwrap();
    // Here the files are missing: a full check refuses the configuration.
    let full = match Config::load(&path, &no_env) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected problems, got {other:?}"),
    };
    let keys: Vec<&str> = full.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(keys, ["outbound.extra_ca_file", "policy.file"], "{full:?}");
    // Without the files, the rest is checked and they are listed.
    let (c, unchecked) = Config::check_without_files(&path, &no_env).unwrap();
    assert_eq!(c.tenants.len(), 3);
    assert_eq!(
        unchecked,
        [
            "outbound.extra_ca_file = /mounted/corp-ca.pem",
            "policy.file = /mounted/policy.toml"
        ]
    );
    // Anything else wrong is still a problem.
    std::fs::write(&path, text.replace("plaintext = true", "plaintext = 7")).unwrap();
    assert!(Config::check_without_files(&path, &no_env).is_err());
}

const HSM: &str = r#"
[tenants.onprem]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "pkcs11", module = "/usr/lib/softhsm/libsofthsm2.so", token = "broker hsm", key = "onprem-app", pin_file = "/run/secrets/hsm-pin", algorithm = "PS256" }

[tenants.onprem2]
tenant_id = "55555555-5555-5555-5555-555555555555"
client_id = "66666666-6666-6666-6666-666666666666"
credential = { type = "pkcs11", module = "/usr/lib/softhsm/libsofthsm2.so", token = "other", key = "onprem2-app", pin_env = "HSM_USER_PIN" }
"#;

#[test]
fn a_pkcs11_credential_names_its_module_token_key_and_where_the_pin_is() {
    let c = Config::from_toml_str(&format!("{GOOD}{HSM}"), Path::new("/"), &no_env).unwrap();
    let Credential::Pkcs11 {
        module,
        token,
        uri,
        key,
        pin,
        algorithm,
        thumbprint,
    } = &c.tenants["onprem"].credential
    else {
        panic!("{:?}", c.tenants["onprem"].credential)
    };
    assert_eq!(module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
    assert_eq!((token.as_str(), key.as_str()), ("broker hsm", "onprem-app"));
    assert_eq!(
        uri.as_str(),
        "pkcs11:token=broker%20hsm?module-path=%2Fusr%2Flib%2Fsofthsm%2Flibsofthsm2.so"
    );
    assert_eq!(pin, &PinSource::File("/run/secrets/hsm-pin".into()));
    assert_eq!(
        (*algorithm, *thumbprint),
        (SigningAlgorithm::PS256, ThumbprintHeader::X5t)
    );
    assert!(matches!(
        &c.tenants["onprem2"].credential,
        Credential::Pkcs11 { pin: PinSource::Env(e), uri: u, .. } if e == "HSM_USER_PIN" && u != uri
    ));
    assert!(
        c.summary()
            .contains("onprem-app on pkcs11:token=broker%20hsm"),
        "{}",
        c.summary()
    );
}

#[test]
fn a_pkcs11_credential_is_explained_when_incomplete_mixed_or_holding_the_pin() {
    let tenant = |name: &str, credential: &str| {
        format!(
            "\n[tenants.{name}]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\nclient_id = \"66666666-6666-6666-6666-666666666666\"\ncredential = {{ type = \"pkcs11\", {credential} }}\n"
        )
    };
    let bad = [
        tenant("relative", r#"module = "libsofthsm2.so", token = "t", key = "k", pin_file = "/p""#),
        tenant("bare", r#"module = "/m.so""#),
        tenant("both", r#"module = "/m.so", token = "t", key = "k", pin_file = "/p", pin_env = "P""#),
        tenant("pinenv", r#"module = "/m.so", token = "t", key = "k", pin_env = "1234""#),
        tenant("pinrel", r#"module = "/m.so", token = "t", key = "k", pin_file = "pin.txt""#),
        tenant("long", r#"module = "/m.so", token = "a-token-label-longer-than-32-bytes", key = "k", pin_file = "/p""#),
        tenant("mixed", r#"module = "/m.so", token = "t", key = "k", pin_file = "/p", vault_url = "https://v.vault.azure.net""#),
    ]
    .concat();
    let kv = "\n[tenants.kvpin]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\nclient_id = \"66666666-6666-6666-6666-666666666666\"\ncredential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"app\", pin_file = \"/p\" }\n";
    let p = problems(&format!("{GOOD}{bad}{kv}"));
    let at = |path: &str| {
        p.iter()
            .find(|p| p.path == path)
            .map(|p| p.message.clone())
            .unwrap_or_else(|| panic!("no problem at {path}: {p:?}"))
    };
    assert!(at("tenants.relative.credential.module").contains("absolute path"));
    assert!(at("tenants.bare.credential.token").contains("missing"));
    assert!(at("tenants.bare.credential.key").contains("missing"));
    assert!(at("tenants.bare.credential.pin_file").contains("never goes in the configuration"));
    assert!(at("tenants.both.credential.pin_file").contains("not both"));
    assert!(at("tenants.pinenv.credential.pin_env").contains("not the PIN"));
    assert!(at("tenants.pinrel.credential.pin_file").contains("absolute path"));
    assert!(at("tenants.long.credential.token").contains("1 to 32 bytes"));
    assert!(at("tenants.mixed.credential.vault_url").contains("not used by a `pkcs11`"));
    assert!(
        at("tenants.kvpin.credential.pin_file").contains("not used by a `key_vault_certificate`")
    );

    // One token, two PIN sources: refused (a token has one login).
    let twice = HSM.replace("token = \"other\"", "token = \"broker hsm\"");
    let p = problems(&format!("{GOOD}{twice}"));
    assert!(
        p.iter().any(|p| p.path == "tenants.onprem2.credential"
            && p.message.contains("tenant `onprem`")
            && p.message.contains("one user PIN")),
        "{p:?}"
    );

    // A PIN written into the configuration is refused before anything else is read.
    let inline = tenant(
        "inline",
        r#"module = "/m.so", token = "t", key = "k", user_pin = "1234""#,
    );
    let p = problems(&format!("{GOOD}{inline}"));
    assert!(
        p.iter()
            .any(|p| p.path == "tenants.inline.credential.user_pin"
                && p.message.contains("a PIN is a secret")
                && !p.message.contains("1234")),
        "{p:?}"
    );
}

#[test]
fn tokens_are_refused_while_the_audit_trail_fails_unless_configured_to_serve() {
    let read = |extra: &str| {
        Config::from_toml_str(
            &format!("{GOOD}\n[audit]\n{extra}\n"),
            Path::new("/var/tb"),
            &no_env,
        )
        .unwrap()
        .audit
        .refuse_unaudited
    };
    assert!(read(""));
    assert!(read("on_write_failure = \"refuse\""));
    assert!(!read("on_write_failure = \"serve\""));
    let p = problems(&format!("{GOOD}\n[audit]\non_write_failure = \"ignore\"\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "audit.on_write_failure");
    assert!(p[0].message.contains("refuse, serve"), "{p:?}");
}

#[test]
fn spans_too_long_for_a_deadline_are_refused_with_their_bound() {
    let text = format!(
        "{GOOD}\n[cache]\ncertificate_refresh_secs = 9223372036854775807\nsafety_margin_secs = 7200\n\n\
         [resilience]\nretry_budget_secs = 99999999999\nnegative_ttl_secs = 86401\nbreaker_cool_down_secs = 86400\n"
    );
    let p = problems(&text);
    let about = |path: &str| p.iter().find(|p| p.path == path).map(|p| p.message.clone());
    assert_eq!(
        about("cache.certificate_refresh_secs").as_deref(),
        Some(
            "9223372036854775807 is out of range: must be 60 to 604800 seconds (Key Vault is not asked more than once a minute, and a rotated certificate must be noticed within a week)"
        )
    );
    assert!(
        about("cache.safety_margin_secs")
            .unwrap()
            .contains("7200 is out of range: must be 0 to 1800 seconds")
    );
    assert!(
        about("resilience.retry_budget_secs")
            .unwrap()
            .contains("must be 1 to 3600 seconds")
    );
    assert!(
        about("resilience.negative_ttl_secs")
            .unwrap()
            .contains("must be 0 to 86400 seconds")
    );
    assert_eq!(
        about("resilience.breaker_cool_down_secs"),
        None,
        "a day is allowed"
    );
    assert_eq!(p.len(), 4, "{p:?}");
}

#[test]
fn connections_are_aged_out_after_ten_minutes_unless_configured_otherwise() {
    let load = |text: &str| Config::from_toml_str(text, Path::new("/"), &no_env).unwrap();
    assert_eq!(
        load(GOOD).server.max_connection_age,
        Some(Duration::from_secs(600))
    );
    let with = |line: &str| GOOD.replace("plaintext = true", &format!("plaintext = true\n{line}"));
    assert_eq!(
        load(&with("max_connection_age_secs = 0"))
            .server
            .max_connection_age,
        None,
        "0 is never"
    );
    assert_eq!(
        load(&with("max_connection_age_secs = 1800"))
            .server
            .max_connection_age,
        Some(Duration::from_secs(1800))
    );
    let p = problems(&with("max_connection_age_secs = 99999999"));
    assert!(
        p.iter().any(
            |p| p.path == "server.max_connection_age_secs" && p.message.contains("1 to 604800")
        ),
        "{p:?}"
    );
}

#[test]
fn connections_served_at_once_are_bounded_by_default_and_configurably() {
    let load = |text: &str| Config::from_toml_str(text, Path::new("/"), &no_env).unwrap();
    let with = |line: &str| GOOD.replace("plaintext = true", &format!("plaintext = true\n{line}"));
    assert_eq!(load(GOOD).server.max_connections, 10_000);
    assert_eq!(
        load(&with("max_connections = 64")).server.max_connections,
        64
    );
    for bad in ["0", "1000001"] {
        let p = problems(&with(&format!("max_connections = {bad}")));
        assert!(
            p.iter().any(|p| p.path == "server.max_connections"
                && p.message.contains("must be 1 to 1000000")),
            "{p:?}"
        );
    }
}

#[test]
fn a_connections_concurrent_streams_are_bounded_by_default_and_configurably() {
    let load = |text: &str| Config::from_toml_str(text, Path::new("/"), &no_env).unwrap();
    let with = |line: &str| GOOD.replace("plaintext = true", &format!("plaintext = true\n{line}"));
    assert_eq!(load(GOOD).server.max_concurrent_streams, 256);
    assert_eq!(
        load(&with("max_concurrent_streams = 32"))
            .server
            .max_concurrent_streams,
        32
    );
    for bad in ["0", "100001"] {
        let p = problems(&with(&format!("max_concurrent_streams = {bad}")));
        assert!(
            p.iter().any(|p| p.path == "server.max_concurrent_streams"
                && p.message.contains("must be 1 to 100000")),
            "{p:?}"
        );
    }
}

#[test]
fn concurrent_streams_not_above_a_callers_watches_are_a_warning() {
    let load = |streams: u32, watches: u32| {
        let text = GOOD.replace(
            "plaintext = true",
            &format!("plaintext = true\nmax_concurrent_streams = {streams}"),
        );
        let text = format!("{text}\n[limits]\nmax_watches_per_caller = {watches}\n");
        // Valid: a caller may spread its watches over connections.
        let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
        c.warnings
            .iter()
            .filter(|w| w.path == "server.max_concurrent_streams")
            .map(|w| w.message.clone())
            .collect::<Vec<_>>()
    };
    let w = load(32, 100);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("32") && w[0].contains("limits.max_watches_per_caller (100)"),
        "{w:?}"
    );
    // Equal: a caller's watches fill its connection, leaving no stream for a GetToken.
    assert_eq!(load(100, 100).len(), 1);
    assert!(load(101, 100).is_empty());
    assert!(load(256, 100).is_empty());
}

#[test]
fn every_duration_and_count_is_refused_outside_its_range_naming_field_value_and_range() {
    let text = format!(
        "{GOOD}\n[limits]\ncaller_idle_secs = 9223372036854775807\nmax_in_flight = 0\nmax_callers = 99999999999\n\
         [outbound]\nconnect_timeout_secs = 0\nrequest_timeout_secs = 0\n\
         [cache]\ncertificate_refresh_secs = 0\nmax_entries = 99999999999\n\
         [resilience]\nsign_burst = 0\nexchange_burst = 0\nbreaker_failures = 0\n\
         [telemetry]\nmetrics_interval_secs = 0\n\
         [callers.issuers.k8s]\nissuer = \"https://oidc.example\"\naudience = \"a\"\nleeway_secs = 100000\njwks_max_age_secs = 0\njwks_min_refresh_secs = 99999999\n"
    )
    .replace("plaintext = true", "plaintext = true\nshutdown_grace_secs = 99999999\nreload_secs = 0");
    let p = problems(&text);
    let about = |path: &str| {
        p.iter()
            .find(|p| p.path == path)
            .map(|p| p.message.clone())
            .unwrap_or_else(|| panic!("no problem at {path}: {p:?}"))
    };
    assert_eq!(
        about("limits.caller_idle_secs"),
        "9223372036854775807 is out of range: must be 1 to 86400 seconds (a caller's bucket is forgotten after this long without requests)"
    );
    for (path, range) in [
        ("limits.max_in_flight", "must be 1 to 1000000 "),
        ("limits.max_callers", "must be 1 to 10000000 "),
        ("outbound.connect_timeout_secs", "must be 1 to 300 seconds"),
        ("outbound.request_timeout_secs", "must be 1 to 600 seconds"),
        (
            "cache.certificate_refresh_secs",
            "must be 60 to 604800 seconds",
        ),
        ("cache.max_entries", "must be 1 to 10000000 "),
        ("resilience.sign_burst", "0 is out of range: must be 1 to"),
        (
            "resilience.exchange_burst",
            "0 is out of range: must be 1 to",
        ),
        ("resilience.breaker_failures", "must be 1 to 1000 "),
        (
            "telemetry.metrics_interval_secs",
            "must be 1 to 3600 seconds",
        ),
        ("server.shutdown_grace_secs", "must be 0 to 3600 seconds"),
        ("server.reload_secs", "must be 1 to 3600 seconds"),
        (
            "callers.issuers.k8s.leeway_secs",
            "100000 is out of range: must be 0 to 300 seconds",
        ),
        (
            "callers.issuers.k8s.jwks_max_age_secs",
            "must be 60 to 86400 seconds",
        ),
        (
            "callers.issuers.k8s.jwks_min_refresh_secs",
            "must be 1 to 3600 seconds",
        ),
    ] {
        assert!(about(path).contains(range), "{path}: {}", about(path));
    }
    assert_eq!(p.len(), 16, "{p:?}");
    // The bounds themselves are accepted.
    let c = Config::from_toml_str(
        &format!(
            "{GOOD}\n[limits]\ncaller_idle_secs = 86400\n[outbound]\nconnect_timeout_secs = 1\n"
        ),
        Path::new("/"),
        &no_env,
    )
    .unwrap();
    assert_eq!(c.limits.caller_idle, Duration::from_secs(DAY));
}

#[test]
fn tenant_ids_are_a_hyphenated_guid_or_a_domain_name_and_never_a_placeholder_tenant() {
    for good in [
        "22222222-2222-2222-2222-222222222222",
        "contoso.onmicrosoft.com",
        "Contoso.com",
        "a-b.example",
    ] {
        assert!(valid_tenant_id(good), "{good}");
    }
    for bad in [
        "..",
        "...",
        "-contoso-.-",
        "contoso",
        ".contoso.com",
        "contoso..com",
        "-a.example",
        "a-.example",
        "1.2.3.4",
        "22222222222222222222222222222222",
        "urn:uuid:22222222-2222-2222-2222-222222222222",
        "{22222222-2222-2222-2222-222222222222}",
        &format!("{}.com", "a".repeat(64)),
    ] {
        assert!(!valid_tenant_id(bad), "{bad}");
    }
    for placeholder in ["common", "organizations", "Consumers"] {
        let why = tenant_id_problem(placeholder).unwrap();
        assert!(
            why.contains("client credentials need a specific tenant"),
            "{why}"
        );
    }
}

#[test]
fn an_invalid_tenant_is_reported_once_not_again_where_it_is_named() {
    let text = format!(
        "{}\n[resilience]\nprewarm = [{{ tenant = \"contoso\", scopes = [\"https://graph.microsoft.com/.default\"] }}]\n\
         [[policy.grant]]\ncallers = [\"dev:loopback\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
        GOOD.replace("22222222-2222-2222-2222-222222222222", "common")
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.contoso.tenant_id");
    // A tenant that is not declared at all still is a problem where it is named.
    let p = problems(&text.replace("tenant = \"contoso\"", "tenant = \"nowhere\""));
    assert!(
        p.iter()
            .any(|p| p.path == "resilience.prewarm[0].tenant" && p.message.contains("nowhere")),
        "{p:?}"
    );
}

#[test]
fn the_grpc_and_admin_listeners_cannot_share_a_port() {
    for admin in ["127.0.0.1:50051", "0.0.0.0:50051"] {
        let p = problems(&format!("{GOOD}\n[admin]\nlisten = \"{admin}\"\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "admin.listen");
        assert!(
            p[0].message.contains("clashes with the gRPC listener"),
            "{p:?}"
        );
    }
    let env = |k: &str| (k == "TOKENBROKER_ADMIN_LISTEN").then(|| "127.0.0.1:50051".to_string());
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(GOOD, Path::new("/"), &env) else {
        panic!("accepted")
    };
    assert_eq!(p[0].path, "TOKENBROKER_ADMIN_LISTEN", "{p:?}");
    // Other address, or a port chosen by the system: fine.
    for admin in ["127.0.0.2:50051", "127.0.0.1:9091"] {
        Config::from_toml_str(
            &format!("{GOOD}\n[admin]\nlisten = \"{admin}\"\n"),
            Path::new("/"),
            &no_env,
        )
        .unwrap();
    }
}

#[test]
fn a_problem_is_located_at_its_own_table_not_one_whose_name_contains_it() {
    let text = format!(
        "{GOOD}\n[tenants.ab]\ntenant_id = \"nope\"\napp = \"shared\"\n\n\
         [[policy.grant]]\ncallers = [\"dns:a\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n\
         [[policy.grant]]\ncallers = [\"dns:b\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n"
    );
    let line = |needle: &str, nth: usize| {
        text.lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with(needle))
            .nth(nth)
            .map(|(i, _)| i + 1)
    };
    assert_eq!(
        line_of(&text, "tenants.ab.tenant_id"),
        line("tenant_id = \"nope\"", 0)
    );
    assert_eq!(line_of(&text, "tenants.ab"), line("[tenants.ab]", 0));
    assert_eq!(
        line_of(&text, "tenants.fabrikam.app"),
        line("app = \"shared\"", 0)
    );
    assert_eq!(
        line_of(&text, "policy.grant[1].callers"),
        line("callers = [\"dns:b\"]", 0)
    );
    assert_eq!(
        line_of(&text, "policy.grant[0]"),
        line("[[policy.grant]]", 0)
    );
    assert_eq!(
        line_of(&text, "tenants.contoso.credential.vault_url"),
        line(
            "credential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"contoso-app\"",
            0
        )
    );
    assert_eq!(line_of(&text, "tenants"), line("[tenants.", 0));
    assert_eq!(line_of(&text, "tenants.nowhere.tenant_id"), None);
    // A quoted key holding dots is one segment.
    let quoted =
        "[outbound.pin_hosts]\n\"a.example\" = \"127.0.0.1\"\n\"b.example\" = \"127.0.0.1\"\n";
    assert_eq!(line_of(quoted, "outbound.pin_hosts.\"b.example\""), Some(3));
    let p = problems(&text);
    assert_eq!(p[0].path, "tenants.ab.tenant_id");
    assert_eq!(p[0].line, line("tenant_id = \"nope\"", 0), "{p:?}");
}

#[test]
fn names_the_operator_chose_are_not_secrets_and_secret_words_match_whole() {
    let named = |name: &str| {
        format!(
            "\n[tenants.{name}]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\napp = \"shared\"\n"
        )
    };
    let text = format!(
        "{GOOD}{}{}{}{}\n[outbound.pin_hosts]\n\"p12.vault.azure.net\" = \"127.0.0.1\"\n\
         [callers.issuers.secret-issuer]\nissuer = \"https://i.example\"\naudience = \"a\"\n",
        named("app12"),
        named("p12-retail"),
        named("secretariat"),
        named("pin"),
    )
    .replace("[apps.shared]", "[apps.password-app]\nclient_id = \"11111111-1111-1111-1111-111111111111\"\ncredential = { type = \"key_vault_certificate\", vault_url = \"https://v.vault.azure.net\", certificate = \"p\" }\n\n[apps.shared]");
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.tenants.len(), 7);
    // Settings are still refused when a word of their name says secret.
    for key in [
        "client_secret",
        "cert-password",
        "private_key",
        "api_key",
        "user_pin",
        "pfx",
    ] {
        let p = problems(&format!(
            "{GOOD}\n[tenants.evil]\ntenant_id = \"55555555-5555-5555-5555-555555555555\"\n{key} = \"x\"\n"
        ));
        assert_eq!(p.len(), 1, "{key}: {p:?}");
        assert_eq!(p[0].path, format!("tenants.evil.{key}"));
    }
}

#[test]
fn a_url_carrying_a_user_name_or_password_is_refused_without_echoing_it() {
    for (from, to, path) in [
        (
            "https://v.vault.azure.net\", certificate = \"contoso-app\"",
            "https://user:pw@kv-prod.vault.azure.net\", certificate = \"contoso-app\"",
            "tenants.contoso.credential.vault_url",
        ),
        (
            "https://127.0.0.1:8443",
            "https://admin@127.0.0.1:8443",
            "cloud.authority_host",
        ),
    ] {
        let p = problems(&GOOD.replace(from, to));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, path);
        assert!(
            p[0].message
                .contains("credentials never go in the configuration"),
            "{p:?}"
        );
        assert!(!p[0].message.contains("pw"), "{p:?}");
    }
    let p = problems(&format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"http://u:p@collector:4318\"\n"
    ));
    assert_eq!(p[0].path, "telemetry.otlp_endpoint", "{p:?}");
    let env = |k: &str| {
        (k == "TOKENBROKER_OTLP_ENDPOINT").then(|| "http://u:p@collector:4318".to_string())
    };
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(GOOD, Path::new("/"), &env) else {
        panic!("accepted")
    };
    assert_eq!(p[0].path, "TOKENBROKER_OTLP_ENDPOINT", "{p:?}");
    assert!(p[0].message.contains("credentials never go"), "{p:?}");
}

#[test]
fn a_vault_url_names_the_vault_only() {
    let vault = |url: &str| {
        problems(&GOOD.replace(
            "vault_url = \"https://v.vault.azure.net\", certificate = \"contoso-app\"",
            &format!("vault_url = \"{url}\", certificate = \"contoso-app\""),
        ))
    };
    let p = vault("https://kv-prod.vault.azure.net/certificates/contoso-app/0123abcd");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.contoso.credential.vault_url");
    assert!(
        p[0].message.contains(
            "use vault_url = \"https://kv-prod.vault.azure.net\" and certificate = \"contoso-app\""
        ),
        "{p:?}"
    );
    for url in [
        "https://kv-prod.vault.azure.net/somewhere",
        "https://kv-prod.vault.azure.net?api-version=7.4",
        "https://kv-prod.vault.azure.net#x",
    ] {
        let p = vault(url);
        assert!(
            p[0].message
                .contains("use vault_url = \"https://kv-prod.vault.azure.net\""),
            "{url}: {p:?}"
        );
    }
    // A trailing slash is the vault's URL as the portal shows it.
    Config::from_toml_str(
        &GOOD.replace(
            "https://v.vault.azure.net\", certificate = \"contoso-app\"",
            "https://v.vault.azure.net/\", certificate = \"contoso-app\"",
        ),
        Path::new("/"),
        &no_env,
    )
    .unwrap();
}

/// The warnings about contoso's vault URL with `cloud` (a `[cloud]` table's lines) and `url`.
fn vault_warnings(cloud: &str, url: &str) -> Vec<String> {
    let text = GOOD
        .replace(
            "[cloud]\nname = \"custom\"\nauthority_host = \"https://127.0.0.1:8443\"\n",
            &format!("[cloud]\n{cloud}\n"),
        )
        .replace(
            "https://v.vault.azure.net\", certificate = \"contoso-app\"",
            &format!("{url}\", certificate = \"contoso-app\""),
        );
    // Valid: a warning, not a problem.
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env)
        .unwrap_or_else(|e| panic!("{cloud} {url}: {e}"));
    c.warnings
        .iter()
        .filter(|w| w.path == "tenants.contoso.credential.vault_url")
        .map(|w| w.message.clone())
        .collect()
}

#[test]
fn a_vault_outside_the_clouds_key_vault_domain_is_a_warning() {
    // A public vault in a US Government configuration: named as such.
    let w = vault_warnings("name = \"us_gov\"", "https://x.vault.azure.net");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("`x.vault.azure.net` is a Key Vault host of the `public` cloud"),
        "{w:?}"
    );
    assert!(w[0].contains("`NAME.vault.usgovcloudapi.net`"), "{w:?}");
    assert!(w[0].contains("[cloud] name = \"public\""), "{w:?}");
    // Not a Key Vault host of any cloud.
    for (cloud, url) in [
        ("name = \"public\"", "https://evil.example.com"),
        ("name = \"public\"", "https://x.vault.azure.net.example.com"),
        // Only whole labels count, and a vault has a name.
        ("name = \"public\"", "https://xvault.azure.net"),
        ("name = \"public\"", "https://vault.azure.net"),
        ("name = \"china\"", "https://x.vault.usgovcloudapi.example"),
    ] {
        let w = vault_warnings(cloud, url);
        assert_eq!(w.len(), 1, "{cloud} {url}: {w:?}");
        assert!(w[0].contains("is not a Key Vault host of the"), "{w:?}");
    }
    let w = vault_warnings("name = \"public\"", "https://evil.example.com:8443");
    assert!(
        w[0].contains("`NAME.vault.azure.net` (`NAME.managedhsm.azure.net` for a Managed HSM)")
    );
    // Vaults and Managed HSMs of the cloud; loopback (an emulator); a custom cloud, whose
    // Key Vault domain is not known.
    for (cloud, url) in [
        ("", "https://x.vault.azure.net"),
        ("name = \"public\"", "https://kv-prod.vault.azure.net:443/"),
        ("name = \"public\"", "https://x.managedhsm.azure.net"),
        ("name = \"public\"", "https://X.Vault.Azure.Net"),
        ("name = \"us_gov\"", "https://x.vault.usgovcloudapi.net"),
        (
            "name = \"us_gov\"",
            "https://x.managedhsm.usgovcloudapi.net",
        ),
        ("name = \"china\"", "https://x.vault.azure.cn"),
        ("name = \"china\"", "https://x.managedhsm.azure.cn"),
        ("name = \"public\"", "https://127.0.0.1:8443"),
        ("name = \"public\"", "https://localhost:8443"),
        ("name = \"us_gov\"", "https://[::1]:8443"),
        (
            "name = \"custom\"\nauthority_host = \"https://login.example\"",
            "https://evil.example.com",
        ),
    ] {
        assert_eq!(
            vault_warnings(cloud, url),
            Vec::<String>::new(),
            "{cloud} {url}"
        );
    }
}

#[cfg(feature = "emulator")]
#[test]
fn the_emulators_generated_configuration_has_no_vault_warning() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = crate::emulator::Endpoints {
        identity_endpoint: "http://127.0.0.1:1/msi/token".into(),
        identity_header: "h".into(),
        imds_endpoint: "http://127.0.0.1:1".into(),
        key_vault_url: "https://127.0.0.1:2".into(),
        authority_host: "https://127.0.0.1:3".into(),
        ca_cert: dir.path().join("ca.pem").display().to_string(),
        admin_url: "http://127.0.0.1:4".into(),
    };
    let text = crate::dev::broker_config_toml(
        &crate::emulator::EmulatorConfig::demo(),
        &endpoints,
        "127.0.0.1:0".parse().unwrap(),
    );
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, text).unwrap();
    // The CA file is the emulator's, made when it starts.
    let (c, _) = Config::check_without_files(&path, &no_env).unwrap();
    assert!(
        c.tenants
            .values()
            .any(|t| matches!(t.credential, Credential::KeyVaultCertificate { .. }))
    );
    let vault: Vec<_> = c
        .warnings
        .iter()
        .filter(|w| w.path.ends_with("vault_url"))
        .collect();
    assert!(vault.is_empty(), "{vault:?}");
}

#[test]
fn a_shape_error_quotes_its_key_and_says_only_the_first_is_shown() {
    let p = problems(&GOOD.replace("plaintext = true", "plaintext = \"yes\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].message.contains("(at `plaintext`)"), "{p:?}");
    assert!(
        p[0].message.contains("only the first such error is shown"),
        "{p:?}"
    );
    // A line that does not parse is quoted by its key, never its value.
    let p = problems(&format!("{GOOD}\n[audit]\nfile = \"unterminated\n"));
    assert!(p[0].message.contains("(at `file`)"), "{p:?}");
    assert!(!p[0].message.contains("unterminated"), "{p:?}");
}

#[test]
fn a_log_level_that_is_not_a_level_or_directive_is_refused() {
    let level = |l: &str| format!("{GOOD}\n[log]\nlevel = \"{l}\"\n");
    for ok in [
        "warn",
        "INFO",
        "info,tokenbroker=debug",
        "tokenbroker::api=trace",
        "off",
        // A bare target name (that crate at every level) and a numeric level.
        "tokenbroker",
        "info,h2",
        "2",
    ] {
        let c = Config::from_toml_str(&level(ok), Path::new("/"), &no_env).unwrap();
        assert_eq!(c.log.level, ok);
    }
    let p = problems(&level("wrning"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "log.level");
    assert!(p[0].message.contains("`wrning` is not a level"), "{p:?}");
    assert!(p[0].message.contains("info,tokenbroker=debug"), "{p:?}");
    for typo in ["warning", "dbug", "INFOO", "eror"] {
        let p = problems(&level(typo));
        assert!(
            p[0].message
                .contains(&format!("`{}` is not a level", typo.to_ascii_lowercase()))
                || p[0].message.contains(&format!("`{typo}` is not a level")),
            "{typo}: {p:?}"
        );
    }
    let p = problems(&level("info,tokenbroker=loud"));
    assert!(p[0].message.contains("is not a log filter"), "{p:?}");
    let env = |k: &str| (k == "TOKENBROKER_LOG_LEVEL").then(|| "debgu".to_string());
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(GOOD, Path::new("/"), &env) else {
        panic!("accepted")
    };
    assert_eq!(p[0].path, "TOKENBROKER_LOG_LEVEL", "{p:?}");
}

#[test]
fn pre_warm_scopes_are_what_the_broker_and_entra_accept() {
    let prewarm = |scopes: &str| {
        format!(
            "{GOOD}\n[resilience]\nprewarm = [{{ tenant = \"contoso\", scopes = [{scopes}] }}]\n"
        )
    };
    for bad in [
        "\"User.Read\"",
        "\"graph\"",
        "\"https://graph.microsoft.com/User.Read\"",
        "\"/.default\"",
    ] {
        let p = problems(&prewarm(bad));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].path, "resilience.prewarm[0].scopes");
        assert!(p[0].message.contains("AADSTS1002012"), "{p:?}");
        assert!(
            p[0].message
                .contains("https://graph.microsoft.com/.default"),
            "{p:?}"
        );
    }
    let p = problems(&prewarm("\"api://x/.default\", \"a b\""));
    assert!(p[0].message.contains("contains whitespace"), "{p:?}");
    let p = problems(&prewarm(""));
    assert!(p[0].message.contains("at least one scope"), "{p:?}");
    let c =
        Config::from_toml_str(&prewarm("\"api://x/.default\""), Path::new("/"), &no_env).unwrap();
    assert_eq!(c.resilience.prewarm[0].scopes, ["api://x/.default"]);
}

#[test]
fn grants_that_can_never_be_used_are_refused_or_warned_about() {
    let grant = |callers: &str, scopes: &str| {
        format!(
            "{GOOD}\n[[policy.grant]]\ncallers = [{callers}]\ntenants = [\"contoso\"]\nscopes = [{scopes}]\n"
        )
    };
    // An issuer name the file does not declare: warned, as a live reload accepts it.
    let c = Config::from_toml_str(
        &grant(
            "\"jwt:k8s:system:serviceaccount:a:b\"",
            "\"https://graph.microsoft.com/.default\"",
        ),
        Path::new("/"),
        &no_env,
    )
    .unwrap();
    assert!(
        c.warnings.iter().any(|w| w.path == "policy.grant"
            && w.message.contains("no [callers.issuers.k8s] is configured")),
        "{:?}",
        c.warnings
    );
    // A scope the broker refuses in every request is refused in the grant too.
    let p = problems(&grant("\"dev:loopback\"", "\"a\\tb\""));
    assert!(p[0].message.contains("contains whitespace"), "{p:?}");
    // A client-certificate caller without a client CA, or a scope Entra refuses: warned.
    let c = Config::from_toml_str(
        &grant(
            "\"dns:a.example\"",
            "\"https://graph.microsoft.com/User.Read\"",
        ),
        Path::new("/"),
        &no_env,
    )
    .unwrap();
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter().any(
            |w| w.contains("`dns:a.example` is a client-certificate identity")
                && w.contains("server.client_ca_file")
        ),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("never served")
                && w.contains("https://graph.microsoft.com/.default")),
        "{w:?}"
    );
    // Of a grant's scopes, the one that is never served is named; the others are served.
    let c = Config::from_toml_str(
        &grant(
            "\"dev:loopback\"",
            "\"https://graph.microsoft.com/.default\", \"https://graph.microsoft.com/User.Read\"",
        )
        .replace(
            "plaintext = true",
            "plaintext = true\n[callers]\ndev_loopback = true",
        ),
        Path::new("/"),
        &no_env,
    )
    .unwrap();
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("granted scope never served: `https://graph.microsoft.com/User.Read`"),
        "{w:?}"
    );
    assert!(!w[0].contains("grant is never served"), "{w:?}");
    // Staged setup: nobody can authenticate yet and nothing is granted; valid, with warnings.
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    let paths: Vec<&str> = c.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(paths, ["policy", "callers"], "{:?}", c.warnings);
    assert!(
        c.warnings[1].message.contains("no caller can authenticate"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn the_listener_and_outbound_tls_files_must_exist_and_load_as_serve_loads_them() {
    let dir = tls_files("ca.pem");
    let listener = |cert: &str, key: &str, extra: &str| {
        GOOD.replace(
            "listen = \"127.0.0.1:50051\"\nplaintext = true",
            &format!("listen = \"0.0.0.0:50051\"\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n{extra}"),
        )
    };
    let load = |text: &str| Config::from_toml_str(text, dir.path(), &no_env);
    load(&listener(
        "tls.crt",
        "tls.key",
        "client_ca_file = \"ca.pem\"",
    ))
    .unwrap();
    let paths = |r: Result<Config, ConfigError>| match r {
        Err(ConfigError::Invalid(p)) => p
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect::<Vec<_>>(),
        other => panic!("expected problems, got {other:?}"),
    };
    let p = paths(load(&listener("missing.crt", "tls.key", "")));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "server.tls_cert_file");
    assert!(p[0].1.contains("missing.crt does not exist"), "{p:?}");
    let p = paths(load(&listener("tls.crt", "garbage.pem", "")));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "server.tls_key_file", "{p:?}");
    let p = paths(load(&listener(
        "tls.crt",
        "tls.key",
        "client_ca_file = \"garbage.pem\"",
    )));
    assert_eq!(p[0].0, "server.client_ca_file", "{p:?}");
    let p = paths(load(&format!(
        "{GOOD}\n[outbound]\nextra_ca_file = \"garbage.pem\"\n"
    )));
    assert_eq!(p[0].0, "outbound.extra_ca_file", "{p:?}");
    let p = paths(load(&format!(
        "{GOOD}\n[audit]\noutput = \"file\"\nfile = \"nodir/audit.jsonl\"\n"
    )));
    assert_eq!(p[0].0, "audit.file", "{p:?}");
    assert!(p[0].1.contains("does not exist"), "{p:?}");
    // A directory given for the file (or an empty name: the configuration's own directory)
    // cannot be opened for appending: `serve` would stop at start.
    std::fs::create_dir(dir.path().join("audit")).unwrap();
    for file in ["audit", ""] {
        let p = paths(load(&format!(
            "{GOOD}\n[audit]\noutput = \"file\"\nfile = \"{file}\"\n"
        )));
        assert_eq!(p[0].0, "audit.file", "{p:?}");
        assert!(p[0].1.contains("is a directory"), "{p:?}");
    }

    // Elsewhere, they are listed as not checked.
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, listener("/mounted/tls.crt", "/mounted/tls.key", "")).unwrap();
    let (_, unchecked) = Config::check_without_files(&path, &no_env).unwrap();
    assert_eq!(
        unchecked,
        [
            "server.tls_cert_file = /mounted/tls.crt",
            "server.tls_key_file = /mounted/tls.key"
        ]
    );
}

#[test]
fn a_server_certificate_outside_its_validity_is_refused_and_one_near_its_end_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let config = |name: &str, not_before, not_after| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["broker".into()]).unwrap();
        p.not_before = not_before;
        p.not_after = not_after;
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        GOOD.replace(
            "listen = \"127.0.0.1:50051\"\nplaintext = true",
            &format!("listen = \"0.0.0.0:50051\"\ntls_cert_file = \"{name}.crt\"\ntls_key_file = \"{name}.key\""),
        )
    };
    let load = |text: &str| Config::from_toml_str(text, dir.path(), &no_env);
    let refused = |text: &str| match load(text) {
        Err(ConfigError::Invalid(p)) => {
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].path, "server.tls_cert_file", "{p:?}");
            p[0].message.clone()
        }
        other => panic!("expected a problem, got {other:?}"),
    };
    let m = refused(&config("expired", now - 60 * day, now - day));
    assert!(
        m.contains("expired.crt: expired at ") && m.contains("renew it"),
        "{m}"
    );
    let m = refused(&config("early", now + day, now + 60 * day));
    assert!(m.contains("early.crt: not valid before "), "{m}");

    let ending = load(&config("ending", now - day, now + 3 * day)).unwrap();
    let w: Vec<_> = ending
        .warnings
        .iter()
        .filter(|w| w.path == "server.tls_cert_file")
        .collect();
    assert_eq!(w.len(), 1, "{:?}", ending.warnings);
    assert!(
        w[0].message.contains("the certificate expires in 2 days"),
        "{w:?}"
    );
    let fine = load(&config("fine", now - day, now + 60 * day)).unwrap();
    assert!(
        fine.warnings
            .iter()
            .all(|w| w.path != "server.tls_cert_file"),
        "{:?}",
        fine.warnings
    );
}

#[test]
fn a_problem_caused_by_an_environment_override_names_the_variable() {
    let env = |k: &str| match k {
        "TOKENBROKER_LISTEN" => Some("0.0.0.0:50051".to_string()),
        "TOKENBROKER_IDENTITY_CLIENT_ID" => Some("not-a-guid".to_string()),
        "TOKENBROKER_EXTRA_CA_FILE" => Some("/nowhere/ca.pem".to_string()),
        _ => None,
    };
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(GOOD, Path::new("/"), &env) else {
        panic!("accepted")
    };
    let at = |path: &str| {
        p.iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {p:?}"))
    };
    assert!(
        at("server.plaintext")
            .message
            .contains("not 0.0.0.0:50051 (from TOKENBROKER_LISTEN)"),
        "{p:?}"
    );
    assert_eq!(at("TOKENBROKER_IDENTITY_CLIENT_ID").line, None);
    assert!(
        at("TOKENBROKER_EXTRA_CA_FILE")
            .message
            .contains("/nowhere/ca.pem"),
        "{p:?}"
    );
    assert_eq!(p.len(), 3, "{p:?}");
}

#[test]
fn the_summary_lists_the_environment_overrides_applied() {
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    assert!(c.overrides.is_empty());
    assert!(
        !c.summary().contains("from the environment"),
        "{}",
        c.summary()
    );
    let env = |k: &str| match k {
        "TOKENBROKER_LISTEN" => Some("127.0.0.2:6000".to_string()),
        "TOKENBROKER_LOG_LEVEL" => Some("debug".to_string()),
        _ => None,
    };
    let c = Config::from_toml_str(GOOD, Path::new("/"), &env).unwrap();
    assert!(
        c.summary().contains(
            "from the environment, overriding the file: TOKENBROKER_LISTEN (server.listen), TOKENBROKER_LOG_LEVEL (log.level)"
        ),
        "{}",
        c.summary()
    );
}

/// What the AKS workload identity webhook sets in a pod, with a token file in `dir`.
fn pod_env(dir: &Path) -> impl Fn(&str) -> Option<String> {
    let token = dir.join("azure-identity-token");
    std::fs::write(&token, "projected-token").unwrap();
    move |k: &str| match k {
        "AZURE_CLIENT_ID" => Some("77777777-7777-7777-7777-777777777777".into()),
        "AZURE_TENANT_ID" => Some("88888888-8888-8888-8888-888888888888".into()),
        "AZURE_FEDERATED_TOKEN_FILE" => Some(token.display().to_string()),
        _ => None,
    }
}

#[test]
fn workload_identity_without_the_webhooks_variables_names_each_and_what_sets_them() {
    let text = format!("{GOOD}\n[identity]\nsource = \"workload_identity\"\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "identity.source");
    assert_eq!(p[0].line, line_of(&text, "identity.source"));
    let m = &p[0].message;
    assert!(
        m.contains("needs AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE in the broker's environment, and none is set: "),
        "{m}"
    );
    assert!(
        m.contains("labelled `azure.workload.identity/use: \"true\"`")
            && m.contains(
                "annotated `azure.workload.identity/client-id: <the identity's client id>`"
            ),
        "{m}"
    );
    assert!(m.contains("--files-elsewhere"), "{m}");

    // From the environment too, named where it came from; a configured client id is used
    // instead of AZURE_CLIENT_ID, which is then not asked for.
    let dir = tempfile::tempdir().unwrap();
    let pod = pod_env(dir.path());
    let env = |k: &str| match k {
        "TOKENBROKER_IDENTITY_SOURCE" => Some("workload_identity".into()),
        "TOKENBROKER_IDENTITY_CLIENT_ID" => Some("99999999-9999-9999-9999-999999999999".into()),
        "AZURE_TENANT_ID" => pod(k),
        _ => None,
    };
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(GOOD, Path::new("/"), &env) else {
        panic!("accepted")
    };
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "TOKENBROKER_IDENTITY_SOURCE");
    assert!(
        p[0].message
            .contains("AZURE_FEDERATED_TOKEN_FILE is not set")
            && !p[0].message.contains("AZURE_CLIENT_ID"),
        "{p:?}"
    );

    // All set, as in the pod: valid.
    let c = Config::from_toml_str(&text, Path::new("/"), &pod).unwrap();
    assert_eq!(c.identity.source, IdentitySource::WorkloadIdentity);
    // Set but wrong: each named with what is wrong.
    let wrong = |var: &str, value: &str| {
        let env = |k: &str| {
            if k == var {
                Some(value.to_owned())
            } else {
                pod(k)
            }
        };
        match Config::from_toml_str(&text, Path::new("/"), &env) {
            Err(ConfigError::Invalid(p)) => p[0].message.clone(),
            other => panic!("{var}={value}: {other:?}"),
        }
    };
    let m = wrong(
        "AZURE_FEDERATED_TOKEN_FILE",
        "/nowhere/azure-identity-token",
    );
    assert!(
        m.starts_with(
            "AZURE_FEDERATED_TOKEN_FILE names /nowhere/azure-identity-token, which cannot be read"
        ),
        "{m}"
    );
    assert!(
        wrong("AZURE_TENANT_ID", "../x")
            .starts_with("AZURE_TENANT_ID: `../x` is not an Entra tenant id")
    );
    assert!(wrong("AZURE_CLIENT_ID", "app").starts_with("AZURE_CLIENT_ID: `app` is not a GUID"));
    assert!(wrong("AZURE_CLIENT_ID", " ").contains("AZURE_CLIENT_ID is not set"));
    let only_client = |k: &str| (k == "AZURE_CLIENT_ID").then(|| pod(k)).flatten();
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(&text, Path::new("/"), &only_client)
    else {
        panic!("accepted")
    };
    assert!(
        p[0].message
            .contains("and AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE are not set: "),
        "{p:?}"
    );
}

#[test]
fn workload_identity_exchanges_at_the_configured_cloud_else_where_azure_authority_host_says() {
    let dir = tempfile::tempdir().unwrap();
    let pod = pod_env(dir.path());
    let pod = &pod;
    let with = |authority: Option<&'static str>| {
        move |k: &str| {
            if k == AUTHORITY_HOST_VAR {
                authority.map(str::to_owned)
            } else {
                pod(k)
            }
        }
    };
    let wi = "\n[identity]\nsource = \"workload_identity\"\n";
    let about_authority = |c: &Config| -> Vec<Problem> {
        c.warnings
            .iter()
            .filter(|w| w.message.contains(AUTHORITY_HOST_VAR))
            .cloned()
            .collect()
    };
    let webhook = Some("https://login.microsoftonline.com/");

    // A named cloud wins over what the webhook says, which is then a warning if it differs.
    let named = format!("{GOOD}{wi}");
    let env = with(webhook);
    let c = Config::from_toml_str(&named, Path::new("/"), &env).unwrap();
    let emulator = Url::parse("https://127.0.0.1:8443").unwrap();
    assert_eq!(c.identity.cloud_authority.as_ref(), Some(&emulator));
    assert_eq!(
        workload_identity_authority(c.identity.cloud_authority.as_ref(), &env).unwrap(),
        emulator
    );
    let w = about_authority(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].path, "cloud.name");
    assert!(
        w[0].message.contains("https://login.microsoftonline.com/")
            && w[0].message.contains("https://127.0.0.1:8443/"),
        "{w:?}"
    );
    // The public cloud named, as the webhook says (its value ends with a slash): no warning.
    let public = named.replace(
        "name = \"custom\"\nauthority_host = \"https://127.0.0.1:8443\"",
        "name = \"public\"",
    );
    let c = Config::from_toml_str(&public, Path::new("/"), &env).unwrap();
    assert_eq!(
        c.identity.cloud_authority.as_ref().map(Url::as_str),
        Some("https://login.microsoftonline.com/")
    );
    assert!(about_authority(&c).is_empty(), "{:?}", c.warnings);

    // No cloud named: AZURE_AUTHORITY_HOST, else the public cloud, as the SDK would.
    let unnamed = named.replace(
        "[cloud]\nname = \"custom\"\nauthority_host = \"https://127.0.0.1:8443\"\n",
        "",
    );
    assert!(!unnamed.contains("[cloud]"));
    for (set, used) in [
        (None, "https://login.microsoftonline.com/"),
        (webhook, "https://login.microsoftonline.com/"),
        (
            Some("https://login.microsoftonline.us/"),
            "https://login.microsoftonline.us/",
        ),
    ] {
        let env = with(set);
        let c = Config::from_toml_str(&unnamed, Path::new("/"), &env).unwrap();
        assert_eq!(c.identity.cloud_authority, None);
        assert_eq!(
            workload_identity_authority(None, &env).unwrap().as_str(),
            used
        );
        // Tenants in the public cloud and the identity elsewhere: a warning.
        let w = about_authority(&c);
        assert_eq!(
            w.len(),
            usize::from(used.ends_with(".us/")),
            "{set:?}: {w:?}"
        );
    }
    // A variable that would be used must be an https URL.
    for bad in ["http://login.example", "login.microsoftonline.com"] {
        let env = |k: &str| {
            if k == AUTHORITY_HOST_VAR {
                Some(bad.to_owned())
            } else {
                pod(k)
            }
        };
        let Err(ConfigError::Invalid(p)) = Config::from_toml_str(&unnamed, Path::new("/"), &env)
        else {
            panic!("{bad} accepted")
        };
        assert_eq!(p[0].path, "identity.source");
        assert!(p[0].message.contains(AUTHORITY_HOST_VAR), "{p:?}");
        // With a cloud named it is not used, so not a problem (a warning).
        Config::from_toml_str(&named, Path::new("/"), &env).unwrap();
    }
}

#[test]
fn away_from_the_pod_workload_identitys_environment_is_listed_as_not_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!("{GOOD}\n[identity]\nsource = \"workload_identity\"\n"),
    )
    .unwrap();
    let (c, unchecked) = Config::check_without_files(&path, &no_env).unwrap();
    assert_eq!(c.identity.source, IdentitySource::WorkloadIdentity);
    assert_eq!(
        unchecked,
        [
            "identity.source = workload_identity: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE (the pod's environment and token file)"
        ]
    );
}

#[test]
fn the_summary_says_where_workload_identity_takes_its_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::from_toml_str(
        &format!("{GOOD}\n[identity]\nsource = \"workload_identity\"\n"),
        Path::new("/"),
        &pod_env(dir.path()),
    )
    .unwrap();
    assert!(
        c.summary()
            .contains("identity WorkloadIdentity (client id from AZURE_CLIENT_ID)"),
        "{}",
        c.summary()
    );
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    assert!(
        c.summary().contains("identity Auto (system-assigned)"),
        "{}",
        c.summary()
    );
}

#[test]
fn a_granted_scope_whose_tokens_an_issuer_accepts_back_is_warned_about() {
    let config = |scope: &str| {
        format!(
            "{GOOD}\n[callers]\naudience = \"api://tokenbroker\"\n\
             [callers.issuers.contoso-entra]\nissuer = \"https://login.microsoftonline.com/c0c0c0c0-0000-4000-8000-00000000c001/v2.0\"\n\
             audience = \"api://contoso-api\"\nidentity_claim = \"appid\"\n\
             [[policy.grant]]\ncallers = [\"spiffe://example.org/fetcher\"]\ntenants = [\"contoso\"]\nscopes = [\"{scope}\"]\n"
        )
    };
    let warned = |scope: &str| {
        let c = Config::from_toml_str(&config(scope), Path::new("/"), &no_env).unwrap();
        c.warnings.iter().any(|w| {
            w.path == "policy.grant"
                && w.message
                    .contains("accepted back as caller credentials by issuer `contoso-entra`")
        })
    };
    assert!(warned("api://contoso-api/.default"));
    assert!(
        warned("API://Contoso-Api/.default"),
        "names compared without case"
    );
    assert!(!warned("https://graph.microsoft.com/.default"));
}

#[test]
fn an_entra_issuer_mixing_token_versions_is_warned() {
    let tid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let api = "6e1f2b3c-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    let warnings = |issuer: &str, audience: &str, claim: &str| -> Vec<String> {
        let text = format!(
            "{GOOD}\n[callers]\naudience = \"{audience}\"\n\
             [callers.issuers.corp]\nissuer = \"{issuer}\"\nidentity_claim = \"{claim}\"\n"
        );
        let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
        c.warnings
            .iter()
            .filter(|w| w.path.starts_with("callers.issuers.corp"))
            .map(|w| w.to_string())
            .collect()
    };
    let v2 = format!("https://login.microsoftonline.com/{tid}/v2.0");
    let v1 = format!("https://sts.windows.net/{tid}/");
    // v2.0 tokens: azp, and the API's client id as audience.
    assert!(warnings(&v2, api, "azp").is_empty());
    let w = warnings(&v2, api, "appid");
    assert!(w.iter().any(|w| w.contains("`azp`, not `appid`")), "{w:?}");
    let w = warnings(&v2, "api://tokenbroker", "azp");
    assert!(
        w.iter()
            .any(|w| w.contains("never an App ID URI such as `api://tokenbroker`")),
        "{w:?}"
    );
    // v1.0 tokens: appid, and the App ID URI as audience.
    assert!(warnings(&v1, "api://tokenbroker", "appid").is_empty());
    let w = warnings(&v1, "api://tokenbroker", "azp");
    assert!(w.iter().any(|w| w.contains("`appid`, not `azp`")), "{w:?}");
    // Other issuers name callers as they like.
    assert!(warnings("https://oidc.example/c1", "api://tokenbroker", "azp").is_empty());
}

#[test]
fn grant_problems_are_reported_at_their_own_lines() {
    // Inline: at the key, in the main file, without a repeated prefix.
    let text = format!(
        "{GOOD}\n[[policy.grant]]\ncallers = [\"dns:a\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n\
         [[policy.grant]]\ncallers = [\"dns:b\"]\ntenants = [\"nope\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n"
    );
    let p = problems(&text);
    let tenants_line = text
        .lines()
        .position(|l| l == "tenants = [\"nope\"]")
        .unwrap()
        + 1;
    let bad = p
        .iter()
        .find(|p| p.path == "policy.grant[1].tenants")
        .unwrap_or_else(|| panic!("{p:?}"));
    assert_eq!(bad.line, Some(tenants_line), "{bad}");
    assert!(!bad.message.contains("policy.grant"), "{bad}");
    // A policy file: its own lines, for grants and for syntax.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "# grants\n[[grant]]\ncallers = [\"dns:a\"]\ntenants = [\"contoso\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n\n\
         [[grant]]\ncallers = [\"dns:b\"]\ntenants = [\"nope\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
    )
    .unwrap();
    let text = format!(
        "{GOOD}\n[policy]\nfile = {:?}\n",
        file.display().to_string()
    );
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|p| p.path == "policy.file" && p.message.contains("line 9: grant[1].tenants")),
        "{p:?}"
    );
    std::fs::write(&file, "[[grant]]\ncallers = [\"dns:a\"\ntenants = 1\n").unwrap();
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|p| p.path == "policy.file" && p.message.contains(": line 3: missing comma")),
        "{p:?}"
    );
}

#[test]
fn a_misspelt_tokenbroker_variable_is_warned_of_with_the_one_meant() {
    // A PIN variable the configuration names is read too, whatever its name.
    let hsm = HSM.replace("HSM_USER_PIN", "TOKENBROKER_HSM_PIN");
    let c = Config::from_toml_str(&format!("{GOOD}{hsm}"), Path::new("/"), &no_env).unwrap();
    let w = crate::config::unknown_env_warnings(
        [
            "TOKENBROKER_LISTN",
            "TOKENBROKER_LOG",
            "PATH",
            "TOKENBROKER_HSM_PIN",
            "TOKENBROKER_ZZZZZZZZZZZZ",
        ]
        .map(String::from),
        &c,
    );
    let w: Vec<String> = w.iter().map(|p| p.to_string()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("TOKENBROKER_LISTN: not a variable tokenbroker reads"),
        "{w:?}"
    );
    assert!(w[0].ends_with("did you mean TOKENBROKER_LISTEN?"), "{w:?}");
    assert!(!w[1].contains("did you mean"), "{w:?}");
}

#[test]
fn the_managed_identity_the_sdk_takes_from_the_process_is_checked_against_the_configured_source() {
    let vars =
        |set: &'static [&'static str]| move |k: &str| set.contains(&k).then(|| "set".to_owned());
    let app_service = vars(&["IDENTITY_ENDPOINT", "IDENTITY_HEADER"]);
    let load = |source: &str, env: &dyn Fn(&str) -> Option<String>| {
        Config::from_toml_str(
            &format!("{GOOD}\n[identity]\nsource = \"{source}\"\n"),
            Path::new("/"),
            &env,
        )
    };
    let about_identity = |c: &Config| -> Vec<String> {
        c.warnings
            .iter()
            .filter(|w| w.path == "identity.source")
            .map(|w| w.to_string())
            .collect()
    };

    // imds where App Service's variables are set: App Service is what is used, warned.
    let c = load("imds", &app_service).unwrap();
    let w = about_identity(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("identity.source: is imds, but the process has IDENTITY_ENDPOINT and IDENTITY_HEADER set")
            && w[0].contains("from the App Service endpoint IDENTITY_ENDPOINT names, not from IMDS")
            && w[0].contains("source = \"app_service\""),
        "{w:?}"
    );
    // The same from the environment's override, named as such.
    let env = |k: &str| match k {
        "TOKENBROKER_IDENTITY_SOURCE" => Some("imds".into()),
        _ => app_service(k),
    };
    let c = Config::from_toml_str(GOOD, Path::new("/"), &env).unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.path == "TOKENBROKER_IDENTITY_SOURCE"),
        "{:?}",
        c.warnings
    );
    // What is configured is what is used: nothing to say.
    for (source, env) in [
        ("imds", vars(&[])),
        ("imds", vars(&["IDENTITY_ENDPOINT"])),
        ("app_service", app_service),
        ("auto", app_service),
        ("auto", vars(&[])),
    ] {
        let c = load(source, &env).unwrap();
        assert!(about_identity(&c).is_empty(), "{source}: {:?}", c.warnings);
    }
    // app_service without its variables, or a source the SDK refuses: `serve` cannot start.
    for (source, env, says) in [
        (
            "app_service",
            vars(&["IDENTITY_ENDPOINT"]),
            "is app_service but IDENTITY_ENDPOINT and IDENTITY_HEADER are not both set",
        ),
        (
            "imds",
            vars(&["IDENTITY_ENDPOINT", "IMDS_ENDPOINT"]),
            "takes Azure Arc's managed identity, which it does not support",
        ),
        (
            "auto",
            vars(&[
                "IDENTITY_ENDPOINT",
                "IDENTITY_HEADER",
                "IDENTITY_SERVER_THUMBPRINT",
            ]),
            "takes Service Fabric's",
        ),
        (
            "app_service",
            vars(&["MSI_ENDPOINT", "MSI_SECRET"]),
            "takes Azure ML's",
        ),
        ("imds", vars(&["MSI_ENDPOINT"]), "takes Cloud Shell's"),
    ] {
        let Err(ConfigError::Invalid(p)) = load(source, &env) else {
            panic!("{source} accepted")
        };
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "identity.source");
        assert!(p[0].message.contains(says), "{source}: {p:?}");
    }
    // Away from the host, not checked: app_service's variables are listed as such.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!("{GOOD}\n[identity]\nsource = \"app_service\"\n"),
    )
    .unwrap();
    let (_, unchecked) = Config::check_without_files(&path, &no_env).unwrap();
    assert_eq!(
        unchecked,
        [
            "identity.source = app_service: IDENTITY_ENDPOINT, IDENTITY_HEADER (the app's environment)"
        ]
    );
}

#[test]
fn a_default_minimum_validity_beyond_half_a_token_is_warned_of() {
    let warned = |secs: u64| {
        let text = format!("{GOOD}\n[cache]\ndefault_min_validity_secs = {secs}\n");
        let c = Config::from_toml_str(&text, Path::new("/"), &no_env).expect("valid");
        c.warnings
            .iter()
            .filter(|w| w.path == "cache.default_min_validity_secs")
            .map(|w| w.message.clone())
            .collect::<Vec<_>>()
    };
    assert!(warned(1800).is_empty());
    let w = warned(3600);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("at most half a token's life (1800s)"),
        "{w:?}"
    );
}

#[test]
fn client_capabilities_opt_a_tenant_in_to_continuous_access_evaluation() {
    let c = Config::from_toml_str(GOOD, Path::new("/"), &no_env).unwrap();
    assert!(
        c.tenants["contoso"].client_capabilities.is_empty(),
        "off by default"
    );
    let text = GOOD.replace(
        "[tenants.contoso]\n",
        "[tenants.contoso]\nclient_capabilities = [\"cp1\", \"cp1\"]\n",
    );
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.tenants["contoso"].client_capabilities, ["cp1"]);
    assert!(c.tenants["fabrikam"].client_capabilities.is_empty());
    assert!(
        !c.warnings
            .iter()
            .any(|w| w.path.contains("client_capabilities")),
        "{:?}",
        c.warnings
    );
    // An empty list is the same as none.
    let text = GOOD.replace(
        "[tenants.contoso]\n",
        "[tenants.contoso]\nclient_capabilities = []\n",
    );
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
    assert!(c.tenants["contoso"].client_capabilities.is_empty());
}

#[test]
fn an_unknown_client_capability_is_refused_naming_the_known_one() {
    let text = GOOD.replace(
        "[tenants.contoso]\n",
        "[tenants.contoso]\nclient_capabilities = [\"CP1\"]\n",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "tenants.contoso.client_capabilities");
    assert!(
        p[0].message.contains("`CP1` is not a client capability"),
        "{}",
        p[0].message
    );
    assert!(p[0].message.contains("`cp1`"), "{}", p[0].message);
    assert!(p[0].line.is_some());
    // Not a list of strings: the file's shape is wrong.
    let text = GOOD.replace(
        "[tenants.contoso]\n",
        "[tenants.contoso]\nclient_capabilities = \"cp1\"\n",
    );
    assert!(Config::from_toml_str(&text, Path::new("/"), &no_env).is_err());
}

#[test]
fn opting_a_shared_multitenant_app_in_is_warned_of() {
    let text = GOOD.replace(
        "[tenants.fabrikam]\n",
        "[tenants.fabrikam]\nclient_capabilities = [\"cp1\"]\n",
    );
    let c = Config::from_toml_str(&text, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.tenants["fabrikam"].client_capabilities, ["cp1"]);
    let w: Vec<_> = c
        .warnings
        .iter()
        .filter(|w| w.path == "tenants.fabrikam.client_capabilities")
        .collect();
    assert_eq!(w.len(), 1, "{:?}", c.warnings);
    assert!(
        w[0].message.contains("single-tenant apps only"),
        "{}",
        w[0].message
    );
}

/// A directory with a self-signed listener certificate and key (`tls.crt`, `tls.key`), the
/// same certificate as a CA bundle named `ca`, and `garbage.pem`, which holds none.
fn tls_files(ca: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["broker".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("tls.crt", &cert.pem());
    write("tls.key", &key.serialize_pem());
    write(ca, &cert.pem());
    write("garbage.pem", "not a certificate\n");
    dir
}

#[test]
fn the_audit_file_must_be_writable_where_it_is_and_checking_leaves_nothing_behind() {
    let problems_at = |base: &Path, file: &str| match Config::from_toml_str(
        &format!("{GOOD}\n[audit]\noutput = \"file\"\nfile = \"{file}\"\n"),
        base,
        &no_env,
    ) {
        Err(ConfigError::Invalid(p)) => p
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect::<Vec<_>>(),
        Ok(_) => Vec::new(),
        Err(e) => panic!("{e:?}"),
    };
    // A writable directory: valid, and nothing is left in it by the check.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(problems_at(dir.path(), "audit.jsonl"), []);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An existing file is checked for appending, and left as it was.
    std::fs::write(dir.path().join("audit.jsonl"), "x\n").unwrap();
    assert_eq!(problems_at(dir.path(), "audit.jsonl"), []);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap(),
        "x\n"
    );
    // A directory where no file can be created (even by root): named, with why.
    #[cfg(target_os = "linux")]
    {
        let p = problems_at(Path::new("/"), "/proc/audit.jsonl");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "audit.file", "{p:?}");
        assert!(p[0].1.contains("/proc/audit.jsonl"), "{p:?}");
        assert!(p[0].1.contains("cannot be written"), "{p:?}");
    }
    // Read-only by its mode (binding only where the process is not root).
    use std::os::unix::fs::PermissionsExt as _;
    let file = dir.path().join("audit.jsonl");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    if std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .is_err()
    {
        let p = problems_at(dir.path(), "audit.jsonl");
        assert_eq!(p[0].0, "audit.file", "{p:?}");
        assert!(p[0].1.contains("cannot be written"), "{p:?}");
    }
}

#[test]
fn an_upstream_budgets_rate_below_the_least_the_broker_runs_with_is_refused() {
    let text = format!(
        "{GOOD}\n[resilience]\nsign_rate_per_vault = 0.0001\nexchange_rate_per_tenant = 0.0\n"
    );
    let p = problems(&text);
    for path in [
        "resilience.sign_rate_per_vault",
        "resilience.exchange_rate_per_tenant",
    ] {
        let found = p.iter().find(|p| p.path == path);
        assert!(
            found.is_some_and(|p| p.message.contains("at least 0.001")),
            "{path}: {p:?}"
        );
    }
    let least = format!("{GOOD}\n[resilience]\nsign_rate_per_vault = 0.001\n");
    let c = Config::from_toml_str(&least, Path::new("/"), &no_env).unwrap();
    assert_eq!(c.resilience.sign_rate_per_vault, 0.001);
}

#[test]
fn a_callers_in_flight_bound_defaults_to_an_eighth_of_the_brokers_and_is_at_most_it() {
    let load = |limits: &str| {
        Config::from_toml_str(
            &format!("{GOOD}\n[limits]\n{limits}\n"),
            Path::new("/"),
            &no_env,
        )
    };
    assert_eq!(load("").unwrap().limits.max_in_flight_per_caller, 512);
    assert_eq!(
        load("max_in_flight = 100")
            .unwrap()
            .limits
            .max_in_flight_per_caller,
        12
    );
    assert_eq!(
        load("max_in_flight = 3")
            .unwrap()
            .limits
            .max_in_flight_per_caller,
        1,
        "at least one"
    );
    let both = "max_in_flight = 100\nmax_in_flight_per_caller = 100";
    assert_eq!(load(both).unwrap().limits.max_in_flight_per_caller, 100);
    for (value, shown) in [(0, "0"), (101, "101")] {
        let p = problems(&format!(
            "{GOOD}\n[limits]\nmax_in_flight = 100\nmax_in_flight_per_caller = {value}\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "limits.max_in_flight_per_caller");
        assert!(
            p[0].message
                .starts_with(&format!("{shown} is out of range: must be 1 to 100 ")),
            "{}",
            p[0].message
        );
    }
}
