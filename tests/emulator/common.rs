//! Shared helpers: start an emulator, HTTP clients that trust its CA, tokens, assertions.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenbroker::emulator::config::demo;
use tokenbroker::emulator::{Emulator, EmulatorConfig, Endpoints, StartOptions};

pub const VAULT_HOST: &str = "tb-demo.vault.azure.net";
pub const VAULT_RESOURCE: &str = "https://vault.azure.net";
pub const GRAPH: &str = "https://graph.microsoft.com";

pub struct Env {
    pub emu: Emulator,
    /// Keeps the CA file's directory alive.
    pub _dir: tempfile::TempDir,
    /// Plain HTTP (managed identity, admin).
    pub http: reqwest::Client,
    /// HTTPS trusting the emulator CA, with the demo vault's name pinned to loopback.
    pub https: reqwest::Client,
}

pub async fn start(config: EmulatorConfig) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = Emulator::start(config, StartOptions::new(dir.path().join("ca.pem")))
        .await
        .expect("emulator starts");
    let ca = reqwest::Certificate::from_pem(emu.ca_pem().as_bytes()).expect("CA parses");
    let azure_addr: SocketAddr = emu
        .endpoints()
        .key_vault_url
        .trim_start_matches("https://")
        .parse()
        .expect("key vault url is ip:port");
    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_merge([ca])
        .resolve(VAULT_HOST, azure_addr)
        .resolve("login.microsoftonline.com", azure_addr)
        .build()
        .expect("https client");
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    Env {
        emu,
        _dir: dir,
        http,
        https,
    }
}

pub async fn start_demo() -> Env {
    start(EmulatorConfig::demo()).await
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

/// The claims of a JWT without verification.
pub fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt has a payload");
    serde_json::from_slice(&b64url_decode(payload)).expect("claims are JSON")
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_secs() as i64
}

impl Env {
    pub fn ep(&self) -> &Endpoints {
        self.emu.endpoints()
    }

    /// The vault URL by its Azure name (pinned to the emulator), as the broker uses it.
    pub fn vault(&self) -> String {
        let port = self.ep().key_vault_url.rsplit(':').next().expect("port");
        format!("https://{VAULT_HOST}:{port}")
    }

    pub fn authority(&self) -> &str {
        &self.ep().authority_host
    }

    /// A request for a Key Vault token at the App Service endpoint, with its header.
    pub fn app_service_request(&self) -> reqwest::RequestBuilder {
        self.http
            .get(format!(
                "{}?api-version=2019-08-01&resource=https://vault.azure.net",
                self.ep().identity_endpoint
            ))
            .header("X-IDENTITY-HEADER", &self.ep().identity_header)
    }

    /// A managed-identity token through the App Service shape.
    pub async fn mi_token(&self, resource: &str, client_id: Option<&str>) -> String {
        let mut url = reqwest::Url::parse(&self.ep().identity_endpoint).expect("url");
        url.query_pairs_mut()
            .append_pair("api-version", "2019-08-01")
            .append_pair("resource", resource);
        if let Some(c) = client_id {
            url.query_pairs_mut().append_pair("client_id", c);
        }
        let resp = self
            .http
            .get(url)
            .header("X-IDENTITY-HEADER", &self.ep().identity_header)
            .send()
            .await
            .expect("mi request");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// `GET` of the IMDS token endpoint with `Metadata: true` and `query` (after `?`).
    pub async fn imds(&self, query: &str) -> reqwest::Response {
        self.http
            .get(format!(
                "{}/metadata/identity/oauth2/token?{query}",
                self.ep().imds_endpoint
            ))
            .header("Metadata", "true")
            .send()
            .await
            .expect("imds request")
    }

    /// A Key Vault token for the broker's system-assigned identity.
    pub async fn kv_token(&self) -> String {
        self.mi_token(VAULT_RESOURCE, None).await
    }

    pub async fn sign(
        &self,
        token: &str,
        key: &str,
        version: Option<&str>,
        alg: &str,
        digest: &[u8],
    ) -> reqwest::Response {
        let url = format!(
            "{}/keys/{key}/{}/sign?api-version=2025-07-01",
            self.vault(),
            version.unwrap_or("")
        );
        self.https
            .post(url)
            .bearer_auth(token)
            .json(&json!({"alg": alg, "value": b64url(digest)}))
            .send()
            .await
            .expect("sign request")
    }

    pub async fn get_json(&self, token: &str, path: &str) -> (u16, Value) {
        let resp = self
            .https
            .get(format!("{}{path}", self.vault()))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.ep().admin_url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A client assertion for `client_id` signed by Key Vault with the current version of `cert`.
    pub async fn assertion(&self, cert: &str, header: Value, claims: Value) -> String {
        let token = self.kv_token().await;
        let h = b64url(&serde_json::to_vec(&header).expect("header"));
        let c = b64url(&serde_json::to_vec(&claims).expect("claims"));
        let input = format!("{h}.{c}");
        // Key Vault only signs RS256/PS256; other header algs (for negative tests) get RS256.
        let alg = if header["alg"] == "PS256" {
            "PS256"
        } else {
            "RS256"
        };
        let resp = self
            .sign(&token, cert, None, alg, &Sha256::digest(input.as_bytes()))
            .await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        format!("{input}.{}", body["value"].as_str().expect("signature"))
    }

    /// Header + claims of a well-formed RS256 assertion for the demo Contoso app.
    pub async fn contoso_assertion_parts(&self) -> (Value, Value) {
        let token = self.kv_token().await;
        let (_, cert) = self
            .get_json(&token, "/certificates/contoso-app?api-version=2025-07-01")
            .await;
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t": cert["x5t"]});
        let now = now();
        let claims = json!({
            "aud": format!("{}/{}/oauth2/v2.0/token", self.authority(), demo::CONTOSO_TENANT),
            "iss": demo::CONTOSO_APP,
            "sub": demo::CONTOSO_APP,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "exp": now + 600,
        });
        (header, claims)
    }

    /// Posts a client-credentials request; returns status, body and the response headers.
    pub async fn exchange(
        &self,
        tenant: &str,
        form: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = self
            .https
            .post(format!("{}/{tenant}/oauth2/v2.0/token", self.authority()))
            .form(form)
            .send()
            .await
            .expect("token request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, resp.json().await.expect("json body"), headers)
    }

    pub async fn exchange_assertion(
        &self,
        tenant: &str,
        client_id: &str,
        scope: &str,
        assertion: &str,
    ) -> (u16, Value) {
        let (s, b, _) = self
            .exchange(
                tenant,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("scope", scope),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion),
                ],
            )
            .await;
        (s, b)
    }

    /// Verifies an emulator-issued token against the published JWKS; returns its claims.
    pub async fn verify_with_jwks(&self, token: &str, audience: &str) -> Value {
        let jwks: Value = self
            .https
            .get(format!(
                "{}/{}/discovery/v2.0/keys",
                self.authority(),
                demo::CONTOSO_TENANT
            ))
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("jwks json");
        let header = jsonwebtoken::decode_header(token).expect("header");
        let kid = header.kid.expect("kid");
        let key = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .expect("kid in jwks");
        let dk = jsonwebtoken::DecodingKey::from_rsa_components(
            key["n"].as_str().expect("n"),
            key["e"].as_str().expect("e"),
        )
        .expect("decoding key");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_audience(&[audience]);
        jsonwebtoken::decode::<Value>(token, &dk, &v)
            .expect("token verifies")
            .claims
    }
}

/// An AADSTS code from an Entra error body.
pub fn aadsts(body: &Value) -> u64 {
    body["error_codes"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
