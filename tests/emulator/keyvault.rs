//! Key Vault: challenge, token validation, RBAC, sign, certificates, import, no export.

use rsa::pkcs8::DecodePublicKey;
use rsa::{Pkcs1v15Sign, Pss, RsaPublicKey};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokenbroker::emulator::config::{RoleAssignmentConfig, demo};
use tokenbroker::emulator::{EmulatorConfig, VaultRole};

use crate::common::*;

const API: &str = "api-version=2025-07-01";

fn public_key_of(cer_b64: &str) -> RsaPublicKey {
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(cer_b64)
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    RsaPublicKey::from_public_key_der(cert.public_key().raw).unwrap()
}

#[tokio::test]
async fn challenge_without_token() {
    let env = start_demo().await;
    // What the SDKs send first: no Authorization, no body, content-length 0.
    let resp = env
        .https
        .post(format!("{}/keys/contoso-app//sign?{API}", env.vault()))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        format!("Bearer authorization=\"https://login.windows.net/{}\", resource=\"https://vault.azure.net\"", demo::CONTOSO_TENANT).as_str()
    );
    let first_id = resp.headers()["x-ms-request-id"].clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})
    );

    // Every answer names itself with a fresh request id.
    let token = env.kv_token().await;
    let resp = env
        .https
        .get(format!("{}/certificates/contoso-app?{API}", env.vault()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let second_id = &resp.headers()["x-ms-request-id"];
    assert!(uuid::Uuid::parse_str(second_id.to_str().unwrap()).is_ok());
    assert_ne!(&first_id, second_id);

    // Missing api-version is a 400.
    let (status, body) = env.get_json(&token, "/certificates/contoso-app").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "BadParameter");
}

#[tokio::test]
async fn sign_rs256_and_ps256_verify_with_certificate_key() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (status, cert) = env
        .get_json(&token, &format!("/certificates/contoso-app?{API}"))
        .await;
    assert_eq!(status, 200);
    let public = public_key_of(cert["cer"].as_str().unwrap());
    let version = cert["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let digest = Sha256::digest(b"header.claims");

    for (alg, version) in [
        ("RS256", None),
        ("PS256", None),
        ("RS256", Some(version.as_str())),
    ] {
        let resp = env.sign(&token, "contoso-app", version, alg, &digest).await;
        assert_eq!(resp.status(), 200, "{alg}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["kid"],
            format!(
                "{}/keys/contoso-app/{version_id}",
                env.vault(),
                version_id = cert["kid"].as_str().unwrap().rsplit('/').next().unwrap()
            )
        );
        let sig = b64url_decode(body["value"].as_str().unwrap());
        let ok = match alg {
            "RS256" => public
                .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &sig)
                .is_ok(),
            _ => public.verify(Pss::new::<Sha256>(), &digest, &sig).is_ok(),
        };
        assert!(ok, "{alg} signature verifies with the certificate's key");
    }

    // Version-less without the empty segment.
    let resp = env
        .https
        .post(format!("{}/keys/contoso-app/sign?{API}", env.vault()))
        .bearer_auth(&token)
        .json(&json!({"alg": "RS256", "value": b64url(&digest)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Bad requests.
    let resp = env
        .sign(&token, "contoso-app", None, "RS256", &digest[..31])
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "BadParameter"
    );
    let resp = env
        .sign(&token, "contoso-app", None, "ES256", &digest)
        .await;
    assert_eq!(resp.status(), 400);
    let resp = env.sign(&token, "nope", None, "RS256", &digest).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "KeyNotFound");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("A key with (name/id) nope was not found in this key vault.")
    );
    let resp = env
        .sign(
            &token,
            "contoso-app",
            Some("0123456789abcdef0123456789abcdef"),
            "RS256",
            &digest,
        )
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn wrong_audience_bad_token_and_missing_role() {
    let env = start_demo().await;
    let digest = Sha256::digest(b"x");
    let graph = env.mi_token(GRAPH, None).await;
    let resp = env
        .sign(&graph, "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("AKV10022: Invalid audience.")
    );

    // A token not signed by the emulator.
    let token = env.kv_token().await;
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged_sig = b64url(&[0u8; 256]);
    parts[2] = &forged_sig;
    let resp = env
        .sign(&parts.join("."), "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 401);

    // The federated-credential identity has no role on the vault.
    let other = env
        .mi_token(VAULT_RESOURCE, Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let resp = env
        .sign(&other, "contoso-app", None, "RS256", &digest)
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Forbidden");
    assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Caller is not authorized to perform action on resource.")
    );
    let (status, _) = env
        .get_json(&other, &format!("/certificates/contoso-app?{API}"))
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn scoped_role_assignment() {
    let mut config = EmulatorConfig::demo();
    config.vaults[0]
        .role_assignments
        .push(RoleAssignmentConfig {
            principal: demo::FIC_MI_OBJECT_ID.into(),
            role: VaultRole::CryptoUser,
            scope: "keys/fabrikam-app".into(),
        });
    let env = start(config).await;
    let token = env
        .mi_token(VAULT_RESOURCE, Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let digest = Sha256::digest(b"x");
    assert_eq!(
        env.sign(&token, "fabrikam-app", None, "RS256", &digest)
            .await
            .status(),
        200
    );
    assert_eq!(
        env.sign(&token, "contoso-app", None, "PS256", &digest)
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn certificate_bundle_versions_and_key() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (status, cert) = env
        .get_json(&token, &format!("/certificates/contoso-app?{API}"))
        .await;
    assert_eq!(status, 200);
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(cert["cer"].as_str().unwrap())
        .unwrap();
    assert_eq!(cert["x5t"], b64url(&Sha1::digest(&der)));
    let vault = env.vault();
    let id = cert["id"].as_str().unwrap();
    let version = id.rsplit('/').next().unwrap();
    assert_eq!(version.len(), 32);
    assert_eq!(id, format!("{vault}/certificates/contoso-app/{version}"));
    assert_eq!(cert["kid"], format!("{vault}/keys/contoso-app/{version}"));
    assert_eq!(
        cert["sid"],
        format!("{vault}/secrets/contoso-app/{version}")
    );
    assert_eq!(cert["attributes"]["enabled"], true);
    for f in ["nbf", "exp", "created", "updated"] {
        assert!(cert["attributes"][f].is_i64(), "{f}");
    }
    assert_eq!(cert["policy"]["key_props"]["exportable"], false);
    assert_eq!(cert["policy"]["key_props"]["kty"], "RSA");
    assert_eq!(cert["policy"]["key_props"]["key_size"], 2048);
    assert_eq!(cert["policy"]["issuer"]["name"], "Self");

    let (status, list) = env
        .get_json(&token, &format!("/certificates/contoso-app/versions?{API}"))
        .await;
    assert_eq!(status, 200);
    let versions = list["value"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1]["id"], id, "the last version is current");
    let older = versions[0]["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let (status, old) = env
        .get_json(&token, &format!("/certificates/contoso-app/{older}?{API}"))
        .await;
    assert_eq!(status, 200);
    assert_ne!(old["x5t"], cert["x5t"]);

    let (status, fab) = env
        .get_json(&token, &format!("/certificates/fabrikam-app?{API}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(fab["policy"]["key_props"]["key_size"], 3072);

    let (status, key) = env
        .get_json(&token, &format!("/keys/contoso-app?{API}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(key["key"]["kty"], "RSA");
    assert_eq!(key["key"]["kid"], cert["kid"]);
    assert!(key["key"]["n"].is_string() && key["key"]["e"].is_string());
    assert!(key["key"].get("d").is_none(), "public part only");
    let (status, _) = env
        .get_json(&token, &format!("/certificates/nope?{API}"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn no_route_exports_a_private_key() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let (status, _) = env
        .get_json(&token, &format!("/secrets/contoso-app?{API}"))
        .await;
    assert_eq!(status, 403);
    for path in [
        "/keys/contoso-app/export",
        "/keys/contoso-app/backup",
        "/certificates/contoso-app/export",
    ] {
        let resp = env
            .https
            .post(format!("{}{path}?{API}", env.vault()))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn import_pem_creates_a_version() {
    let mut config = EmulatorConfig::demo();
    config.vaults[0]
        .role_assignments
        .push(RoleAssignmentConfig {
            principal: demo::BROKER_MI_OBJECT_ID.into(),
            role: VaultRole::Administrator,
            scope: "*".into(),
        });
    let env = start(config).await;
    let token = env.kv_token().await;

    let kp = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let cert = rcgen::CertificateParams::new(vec!["imported.test".to_owned()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let pem = format!("{}{}", kp.serialize_pem(), cert.pem());
    let body = json!({"value": pem, "policy": {"secret_props": {"contentType": "application/x-pem-file"}}});
    for name in ["imported", "contoso-app"] {
        let resp = env
            .https
            .post(format!("{}/certificates/{name}/import?{API}", env.vault()))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let bundle: Value = resp.json().await.unwrap();
        assert_eq!(bundle["x5t"], b64url(&Sha1::digest(cert.der())));
        let (_, current) = env
            .get_json(&token, &format!("/certificates/{name}?{API}"))
            .await;
        assert_eq!(
            current["id"], bundle["id"],
            "the import is the current version"
        );
    }
    // Apps referencing the whole certificate trust the imported version too.
    let (header, claims) = env.contoso_assertion_parts().await;
    assert_eq!(header["x5t"], b64url(&Sha1::digest(cert.der())));
    let assertion = env.assertion("contoso-app", header, claims).await;
    let (status, body) = env
        .exchange_assertion(
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
            "https://graph.microsoft.com/.default",
            &assertion,
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let (_, list) = env
        .get_json(&token, &format!("/certificates/contoso-app/versions?{API}"))
        .await;
    assert_eq!(list["value"].as_array().unwrap().len(), 3);

    // Sign with the imported key and verify with the imported certificate.
    let digest = Sha256::digest(b"imported");
    let resp = env.sign(&token, "imported", None, "RS256", &digest).await;
    assert_eq!(resp.status(), 200);
    let sig = b64url_decode(
        resp.json::<Value>().await.unwrap()["value"]
            .as_str()
            .unwrap(),
    );
    let public =
        RsaPublicKey::from_public_key_der(&rcgen::PublicKeyData::subject_public_key_info(&kp))
            .unwrap();
    assert!(
        public
            .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &sig)
            .is_ok()
    );

    // Base64-encoded PEM, as the SDKs send it.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&pem);
    let resp = env
        .https
        .post(format!("{}/certificates/b64/import?{API}", env.vault()))
        .bearer_auth(&token)
        .json(&json!({"value": encoded, "policy": {"secret_props": {"contentType": "application/x-pem-file"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // PFX is refused; a mismatched key is refused.
    let resp = env
        .https
        .post(format!("{}/certificates/x/import?{API}", env.vault()))
        .bearer_auth(&token)
        .json(&json!({"value": "MIIabc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let other = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let bad = format!("{}{}", other.serialize_pem(), cert.pem());
    let resp = env
        .https
        .post(format!("{}/certificates/x/import?{API}", env.vault()))
        .bearer_auth(&token)
        .json(&json!({"value": bad}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Without an import role: 403.
    let other_token = env
        .mi_token(VAULT_RESOURCE, Some(demo::FIC_MI_CLIENT_ID))
        .await;
    let resp = env
        .https
        .post(format!("{}/certificates/y/import?{API}", env.vault()))
        .bearer_auth(&other_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn loopback_host_reaches_the_first_vault() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    let resp = env
        .https
        .get(format!(
            "{}/certificates/contoso-app?{API}",
            env.ep().key_vault_url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["kid"]
            .as_str()
            .unwrap()
            .starts_with(&env.ep().key_vault_url)
    );
}

#[tokio::test]
async fn token_from_another_tenant_is_an_invalid_issuer() {
    // A Fabrikam identity holding a role on Contoso's vault: the role does not help, the
    // vault trusts its own tenant's issuers only.
    let mut config = EmulatorConfig::demo();
    let mut stranger = config.identities[0].clone();
    stranger.name = "fabrikam-mi".into();
    stranger.system_assigned = false;
    stranger.client_id = "fabfab00-0000-4000-8000-0000000000c3".into();
    stranger.object_id = "fabfab00-0000-4000-8000-0000000000d3".into();
    stranger.tenant_id = demo::FABRIKAM_TENANT.into();
    config.vaults[0]
        .role_assignments
        .push(RoleAssignmentConfig {
            principal: stranger.object_id.clone(),
            role: VaultRole::Administrator,
            scope: "*".into(),
        });
    config.identities.push(stranger);
    let env = start(config).await;
    let token = env
        .mi_token(VAULT_RESOURCE, Some("fabfab00-0000-4000-8000-0000000000c3"))
        .await;
    assert_eq!(claims(&token)["tid"], demo::FABRIKAM_TENANT);
    let resp = env
        .sign(&token, "contoso-app", None, "RS256", &Sha256::digest(b"x"))
        .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        format!("Bearer authorization=\"https://login.windows.net/{}\", resource=\"https://vault.azure.net\"", demo::CONTOSO_TENANT).as_str(),
        "the challenge names the vault's tenant"
    );
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("AKV10032: Invalid issuer."),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "https://sts.windows.net/{}/",
            demo::CONTOSO_TENANT
        )),
        "{message}"
    );

    // The vault's own tenant still gets in.
    let (status, _) = env
        .get_json(
            &env.kv_token().await,
            &format!("/certificates/contoso-app?{API}"),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn only_known_api_versions() {
    let env = start_demo().await;
    let token = env.kv_token().await;
    // What the SDKs send: Rust 2025-07-01, Python keys 2025-07-01 and certificates 2026-04-01,
    // and older 7.x versions.
    for v in [
        "2025-07-01",
        "2026-04-01",
        "7.6",
        "7.5",
        "7.4",
        "7.0",
        "2016-10-01",
    ] {
        let (status, body) = env
            .get_json(
                &token,
                &format!("/certificates/contoso-app?api-version={v}"),
            )
            .await;
        assert_eq!(status, 200, "{v}: {body}");
    }
    for v in ["7.7", "2025-07-02", "latest"] {
        let (status, body) = env
            .get_json(
                &token,
                &format!("/certificates/contoso-app?api-version={v}"),
            )
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(
            body,
            json!({"error": {"code": "BadParameter", "message": format!("The specified version ({v}) is not recognized. Consider using the latest supported version (2026-04-01).")}})
        );
    }
}

#[tokio::test]
async fn an_apps_own_token_is_accepted_with_its_service_principals_roles() {
    // The Contoso app's service principal holds Certificate User on the vault, nothing more;
    // Key Vault is a resource Contoso knows.
    const SP: &str = "c0c0c0c0-a993-4000-8000-000000000b01";
    let mut config = EmulatorConfig::demo();
    config.tenants[0].resources.push(VAULT_RESOURCE.into());
    config.tenants[0].apps[0].service_principal_id = Some(SP.into());
    config.vaults[0]
        .role_assignments
        .push(RoleAssignmentConfig {
            principal: SP.into(),
            role: VaultRole::CertificateUser,
            scope: "*".into(),
        });
    let env = start(config).await;
    let (header, claims_in) = env.contoso_assertion_parts().await;
    let assertion = env.assertion("contoso-app", header, claims_in).await;
    let (status, body) = env
        .exchange_assertion(
            demo::CONTOSO_TENANT,
            demo::CONTOSO_APP,
            "https://vault.azure.net/.default",
            &assertion,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    // A v1.0 token of the app's service principal, as Entra issues for Key Vault.
    let c = claims(token);
    assert_eq!(c["aud"], VAULT_RESOURCE);
    assert_eq!(c["ver"], "1.0");
    assert_eq!(c["oid"], SP);
    assert_eq!(c["appid"], demo::CONTOSO_APP);

    let (status, cert) = env
        .get_json(token, &format!("/certificates/contoso-app?{API}"))
        .await;
    assert_eq!(status, 200, "{cert}");
    // Its role does not sign: 403 naming the app and its service principal.
    let resp = env
        .sign(token, "contoso-app", None, "RS256", &Sha256::digest(b"x"))
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("appid={};oid={SP}", demo::CONTOSO_APP)),
        "{message}"
    );
}
