//! Key Vault data plane on the HTTPS listener: the bearer challenge and token validation,
//! RBAC, certificates (get, versions, list, PEM import), keys (get public JWK, sign a digest).
//! There is deliberately no route that exports a private key.
//!
//! Paths are parsed by hand rather than with the router because the Rust SDK sends an empty
//! version segment (`/keys/{name}//sign`) when no version is given.
#![allow(
    clippy::result_large_err,
    reason = "early-return error responses are cold paths; boxing them buys nothing"
)]

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::keys::{self, CertVersion, SignAlg, b64std, b64url};
use super::state::{Cert, Shared, State, Vault, VaultOp};

const VAULT_AUDIENCE: &str = "https://vault.azure.net";
/// Key Vault's own application id, also accepted as an audience.
const VAULT_APP_ID: &str = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093";
const CLOCK_SKEW: i64 = 300;
const MAX_BODY: usize = 1 << 20;
/// Key Vault data-plane api-versions: the GA and preview versions, including the defaults of
/// the Rust crates (2025-07-01; 2026-03-01-preview in the betas) and of the Python SDKs
/// (keys 2025-07-01, certificates 2026-04-01). Anything else is refused, as Key Vault does.
const API_VERSIONS: &[&str] = &[
    "2015-06-01",
    "2016-10-01",
    "7.0-preview",
    "7.0",
    "7.1-preview",
    "7.1",
    "7.2-preview",
    "7.2",
    "7.3-preview",
    "7.3",
    "7.4-preview.1",
    "7.4",
    "7.5-preview.1",
    "7.5",
    "7.6-preview.1",
    "7.6-preview.2",
    "7.6",
    "2025-07-01",
    "2026-03-01-preview",
    "2026-04-01",
];
/// Named in the answer to an unknown api-version.
const LATEST_API_VERSION: &str = "2026-04-01";

/// Who called, from a validated bearer token.
struct Caller {
    oid: String,
    appid: String,
    iss: String,
}

/// Key Vault's answers, each with a fresh `x-ms-request-id`.
pub(crate) async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let mut response = route(shared, req).await;
    response
        .headers_mut()
        .insert(super::entra::REQUEST_ID, super::entra::fresh_request_id());
    response
}

async fn route(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let host = super::state::request_host(&parts);
    let base = format!("https://{host}");
    let api_version = parts.uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, v)| k == "api-version" && !v.is_empty())
            .map(|(_, v)| v.into_owned())
    });

    let (vault_name, vault_tenant) = {
        let state = shared.state();
        match state.vault_for_host(&host) {
            Some(i) => (
                state.vaults[i].name.clone(),
                state.vaults[i].tenant_id.clone(),
            ),
            None => {
                return kv_error(
                    StatusCode::NOT_FOUND,
                    "VaultNotFound",
                    &format!("No vault is configured for host {host}."),
                );
            }
        }
    };
    let Some(api_version) = api_version else {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The request URI contains an invalid or missing 'api-version' query parameter.",
        );
    };
    if !API_VERSIONS
        .iter()
        .any(|v| v.eq_ignore_ascii_case(&api_version))
    {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            &format!(
                "The specified version ({api_version}) is not recognized. Consider using the latest supported version ({LATEST_API_VERSION})."
            ),
        );
    }
    let caller = match authenticate(&shared, &parts.headers, &vault_tenant) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The request body is too large or unreadable.",
            );
        }
    };

    let path = parts.uri.path().trim_start_matches('/');
    let segs: Vec<&str> = path.split('/').collect();
    let ctx = Ctx {
        shared: &shared,
        base: &base,
        vault: &vault_name,
        caller: &caller,
    };
    let get = parts.method == Method::GET;
    let post = parts.method == Method::POST;
    match segs.as_slice() {
        ["keys", name, "sign"] | ["keys", name, "", "sign"] if post => ctx.sign(name, None, &body),
        ["keys", name, version, "sign"] if post => ctx.sign(name, Some(version), &body),
        ["keys", name] | ["keys", name, ""] if get => ctx.get_key(name, None),
        ["keys", name, "versions"] if get => ctx.list_versions(name, "keys"),
        ["keys", name, version] if get => ctx.get_key(name, Some(version)),
        ["certificates"] | ["certificates", ""] if get => ctx.list_certs(),
        ["certificates", name, "import"] if post => ctx.import(name, &body).await,
        ["certificates", name] | ["certificates", name, ""] if get => ctx.get_cert(name, None),
        ["certificates", name, "versions"] if get => ctx.list_versions(name, "certificates"),
        ["certificates", name, version] if get => ctx.get_cert(name, Some(version)),
        ["secrets", ..] => kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The emulator never exports private keys: certificates are created with exportable: false.",
        ),
        _ => kv_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "{} /{path} is not an operation this emulator supports.",
                parts.method
            ),
        ),
    }
}

pub(crate) fn kv_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The `WWW-Authenticate` bearer challenge of a vault in `tenant`.
pub(crate) fn challenge(tenant: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "Bearer authorization=\"https://login.windows.net/{tenant}\", resource=\"{VAULT_AUDIENCE}\""
    ))
    .ok()
}

fn unauthorized(tenant: &str, message: &str) -> Response {
    let mut r = kv_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
    if let Some(v) = challenge(tenant) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Validates the bearer token as Key Vault would: signed by a known issuer key, for the vault
/// audience, from the vault tenant's issuer, within its validity window.
fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    vault_tenant: &str,
) -> Result<Caller, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let deny = |m: &str| unauthorized(vault_tenant, m);
    let Some(token) = token else {
        return Err(deny("AKV10000: Request is missing a Bearer or PoP token."));
    };
    let Some(jwt) = keys::parse_jwt(token) else {
        return Err(deny("AKV10021: Token is malformed."));
    };
    if jwt.header_str("kid") != Some(shared.issuer.kid.as_str()) {
        return Err(deny(&format!(
            "AKV10046: Unable to resolve the key used for signature validation. EncodedJwtHeader: '{}'",
            jwt.signing_input.split('.').next().unwrap_or_default()
        )));
    }
    let alg = jwt.header_str("alg").and_then(SignAlg::parse);
    let signature_ok = alg.is_some_and(|alg| {
        keys::verify_jws(
            &shared.issuer.public,
            alg,
            jwt.signing_input.as_bytes(),
            &jwt.signature,
        )
    });
    if !signature_ok {
        return Err(deny("AKV10019: Signature validation failed."));
    }
    let now = shared.now_secs();
    if jwt
        .claim_i64("exp")
        .is_none_or(|exp| exp + CLOCK_SKEW < now)
    {
        return Err(deny("AKV10013: Token expired."));
    }
    if jwt
        .claim_i64("nbf")
        .is_some_and(|nbf| nbf - CLOCK_SKEW > now)
    {
        return Err(deny("Token not yet valid."));
    }
    let auds = jwt.audiences();
    let aud_ok = auds.iter().any(|a| {
        a.trim_end_matches('/').eq_ignore_ascii_case(VAULT_AUDIENCE)
            || a.eq_ignore_ascii_case(VAULT_APP_ID)
    });
    if !aud_ok {
        return Err(deny(&format!(
            "AKV10022: Invalid audience. Expected {VAULT_AUDIENCE}, found: {}.",
            auds.join(", ")
        )));
    }
    let iss = jwt.claim_str("iss").unwrap_or_default().to_owned();
    let tid = jwt.claim_str("tid").unwrap_or_default();
    // A vault trusts its own tenant's issuers only: a token from another tenant, even one
    // the emulator knows, is refused as Key Vault refuses it (AKV10032).
    let vault_tid = {
        let state = shared.state();
        state.tenant(vault_tenant).map_or_else(
            || vault_tenant.to_owned(),
            |i| state.tenants[i].tenant_id.clone(),
        )
    };
    let expected = [
        super::state::v1_issuer(&vault_tid),
        shared.v2_issuer(&vault_tid),
    ];
    if !tid.eq_ignore_ascii_case(&vault_tid)
        || !expected.iter().any(|e| e.eq_ignore_ascii_case(&iss))
    {
        return Err(deny(&format!(
            "AKV10032: Invalid issuer. Expected one of {}, {}, found: {iss}.",
            expected[0], expected[1]
        )));
    }
    Ok(Caller {
        oid: jwt.claim_str("oid").unwrap_or_default().to_owned(),
        appid: jwt
            .claim_str("appid")
            .or(jwt.claim_str("azp"))
            .unwrap_or_default()
            .to_owned(),
        iss,
    })
}

struct Ctx<'a> {
    shared: &'a Shared,
    base: &'a str,
    vault: &'a str,
    caller: &'a Caller,
}

impl Ctx<'_> {
    fn forbidden(&self, op: VaultOp, object: Option<&str>) -> Response {
        let resource = match object {
            Some(o) => format!("/vaults/{}/{o}", self.vault),
            None => format!("/vaults/{}", self.vault),
        };
        let message = format!(
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={};oid={};iss={}\r\nAction: '{}'\r\nResource: '/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/microsoft.keyvault{}'\r\nAssignment: (not found)\r\nDecisionReason: 'DeniedWithNoValidRBAC' \r\nVault: {};location=emulator\r\n",
            self.caller.appid,
            self.caller.oid,
            self.caller.iss,
            op.data_action(),
            resource.to_ascii_lowercase(),
            self.vault
        );
        (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": {"code": "Forbidden", "message": message, "innererror": {"code": "ForbiddenByRbac"}}})),
        )
            .into_response()
    }

    /// Runs `f` on the vault if the caller may do `op` on `object` (`keys/NAME`, ...).
    fn with_vault<T>(
        &self,
        op: VaultOp,
        name: Option<&str>,
        f: impl FnOnce(&Vault) -> T,
    ) -> Result<T, Response> {
        let state = self.shared.state();
        let vault = state
            .vault_by_name(self.vault)
            .map(|i| &state.vaults[i])
            .ok_or_else(|| {
                kv_error(
                    StatusCode::NOT_FOUND,
                    "VaultNotFound",
                    "The vault no longer exists.",
                )
            })?;
        if !vault.allows(&self.caller.oid, op, name) {
            let coll = if matches!(op, VaultOp::Sign | VaultOp::ReadKey) {
                "keys"
            } else {
                "certificates"
            };
            let object = name.map(|n| format!("{coll}/{n}"));
            drop(state);
            return Err(self.forbidden(op, object.as_deref()));
        }
        Ok(f(vault))
    }

    fn sign(&self, name: &str, version: Option<&str>, body: &[u8]) -> Response {
        let found = self.with_vault(VaultOp::Sign, Some(name), |v| {
            v.cert(name)
                .and_then(|c| c.version(version).map(|ver| (c.name.clone(), ver.clone())))
        });
        let (key_name, ver) = match found {
            Err(r) => return r,
            Ok(None) => return key_not_found(name, version),
            Ok(Some(x)) => x,
        };
        let Ok(req) = serde_json::from_slice::<Value>(body) else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The request body is not valid JSON with 'alg' and 'value'.",
            );
        };
        let alg_name = req.get("alg").and_then(Value::as_str).unwrap_or_default();
        let Some(alg) = SignAlg::parse(alg_name) else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "Invalid algorithm '{alg_name}' for an RSA key; this emulator supports RS256 and PS256."
                ),
            );
        };
        let Some(digest) = req
            .get("value")
            .and_then(Value::as_str)
            .and_then(keys::b64url_decode)
        else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "Property 'value' is missing or not base64url.",
            );
        };
        if digest.len() != 32 {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "Invalid length of 'value': {} bytes. {alg_name} requires a 32-byte SHA-256 digest.",
                    digest.len()
                ),
            );
        }
        if let Err(r) = usable(&ver, "sign", self.shared.now_secs()) {
            return r;
        }
        let signature = match keys::sign_digest(&ver.key, alg, &digest) {
            Ok(s) => s,
            Err(e) => return kv_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &e),
        };
        *self
            .shared
            .counters()
            .sign
            .entry(format!("{}/{key_name}/{}", self.vault, ver.version))
            .or_default() += 1;
        axum::Json(json!({
            "kid": format!("{}/keys/{key_name}/{}", self.base, ver.version),
            "value": b64url(&signature),
        }))
        .into_response()
    }

    fn get_key(&self, name: &str, version: Option<&str>) -> Response {
        let found = self.with_vault(VaultOp::ReadKey, Some(name), |v| {
            v.cert(name)
                .and_then(|c| c.version(version).map(|ver| (c.name.clone(), ver.clone())))
        });
        match found {
            Err(r) => r,
            Ok(None) => key_not_found(name, version),
            Ok(Some((key_name, ver))) => {
                axum::Json(self.key_bundle(&key_name, &ver)).into_response()
            }
        }
    }

    fn key_bundle(&self, name: &str, ver: &CertVersion) -> Value {
        let mut key = keys::rsa_jwk(&ver.public);
        if let Value::Object(m) = &mut key {
            m.insert(
                "kid".into(),
                format!("{}/keys/{name}/{}", self.base, ver.version).into(),
            );
            m.insert(
                "key_ops".into(),
                json!([
                    "sign",
                    "verify",
                    "wrapKey",
                    "unwrapKey",
                    "encrypt",
                    "decrypt"
                ]),
            );
        }
        json!({
            "key": key,
            "attributes": {
                "enabled": ver.enabled,
                "nbf": ver.not_before,
                "exp": ver.expires,
                "created": ver.created,
                "updated": ver.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
                "exportable": false,
            },
            "managed": true,
        })
    }

    fn get_cert(&self, name: &str, version: Option<&str>) -> Response {
        let found = self.with_vault(VaultOp::ReadCert, Some(name), |v| {
            v.cert(name)
                .and_then(|c| c.version(version).map(|ver| (c.clone(), ver.clone())))
        });
        match found {
            Err(r) => r,
            Ok(None) => cert_not_found(name, version),
            Ok(Some((cert, ver))) => {
                axum::Json(cert_bundle(self.base, &cert, &ver)).into_response()
            }
        }
    }

    fn list_versions(&self, name: &str, collection: &str) -> Response {
        let op = if collection == "keys" {
            VaultOp::ReadKey
        } else {
            VaultOp::ReadCert
        };
        let base = self.base;
        let found = self.with_vault(op, Some(name), |v| {
            v.cert(name).map(|c| {
                c.versions
                    .iter()
                    .map(|ver| {
                        let id_field = if collection == "keys" { "kid" } else { "id" };
                        let mut item = json!({
                            id_field: format!("{base}/{collection}/{}/{}", c.name, ver.version),
                            "attributes": attributes(ver),
                        });
                        if collection == "certificates"
                            && let Value::Object(m) = &mut item
                        {
                            m.insert("x5t".into(), ver.x5t.clone().into());
                        }
                        item
                    })
                    .collect::<Vec<_>>()
            })
        });
        match found {
            Err(r) => r,
            Ok(None) if collection == "keys" => key_not_found(name, None),
            Ok(None) => cert_not_found(name, None),
            Ok(Some(items)) => {
                axum::Json(json!({"value": items, "nextLink": null})).into_response()
            }
        }
    }

    fn list_certs(&self) -> Response {
        let base = self.base;
        let listed = self.with_vault(VaultOp::ReadCert, None, |v| {
            v.certs
                .iter()
                .filter_map(|c| {
                    let ver = c.current()?;
                    Some(json!({
                        "id": format!("{base}/certificates/{}", c.name),
                        "x5t": ver.x5t,
                        "attributes": attributes(ver),
                    }))
                })
                .collect::<Vec<_>>()
        });
        match listed {
            Err(r) => r,
            Ok(items) => axum::Json(json!({"value": items, "nextLink": null})).into_response(),
        }
    }

    async fn import(&self, name: &str, body: &[u8]) -> Response {
        if let Err(r) = self.with_vault(VaultOp::ImportCert, Some(name), |_| ()) {
            return r;
        }
        let Ok(req) = serde_json::from_slice::<Value>(body) else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The request body is not valid JSON.",
            );
        };
        let Some(value) = req.get("value").and_then(Value::as_str) else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "Property 'value' is required.",
            );
        };
        // The SDKs send `value` base64-encoded even for PEM (as the service accepts); raw PEM
        // text is accepted too.
        let pem = if value.contains("-----BEGIN") {
            value.to_owned()
        } else {
            match base64_pem(value) {
                Some(pem) => pem,
                None => {
                    return kv_error(
                        StatusCode::BAD_REQUEST,
                        "BadParameter",
                        "The emulator imports PEM (certificate and unencrypted private key), raw or base64-encoded; PKCS#12 is not supported.",
                    );
                }
            }
        };
        // RSA key parsing and checks are CPU work; keep them off the async workers.
        let now = self.shared.now_secs();
        let parsed = tokio::task::spawn_blocking(move || keys::import_pem(&pem, now)).await;
        let ver = match parsed {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    &format!("Invalid certificate: {e}"),
                );
            }
            Err(_) => {
                return kv_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "import failed",
                );
            }
        };
        let content_type = req
            .pointer("/policy/secret_props/contentType")
            .and_then(Value::as_str)
            .unwrap_or("application/x-pem-file")
            .to_owned();
        let cert = {
            let mut state = self.shared.state();
            let Some(vi) = state.vault_by_name(self.vault) else {
                return kv_error(
                    StatusCode::NOT_FOUND,
                    "VaultNotFound",
                    "The vault no longer exists.",
                );
            };
            let cert = add_version(&mut state, vi, name, ver.clone(), Some(content_type));
            // Apps that reference the whole certificate ("vault/cert") trust every version of it,
            // imported ones included (use admin rotate with register_on_apps=false to test a
            // key Entra does not know).
            let vault = state.vaults[vi].name.clone();
            state.register_version_on_apps(&vault, &cert.name, &ver);
            cert
        };
        axum::Json(cert_bundle(self.base, &cert, &ver)).into_response()
    }
}

/// Decodes a base64 `value` that holds PEM text.
fn base64_pem(value: &str) -> Option<String> {
    use base64::Engine as _;
    let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()?;
    String::from_utf8(bytes)
        .ok()
        .filter(|t| t.contains("-----BEGIN"))
}

/// Adds a version to a certificate (creating the certificate if needed); returns its new state.
pub(crate) fn add_version(
    state: &mut State,
    vault: usize,
    name: &str,
    ver: CertVersion,
    content_type: Option<String>,
) -> Cert {
    let vault = &mut state.vaults[vault];
    let subject_cn = ver.subject.trim_start_matches("CN=").to_owned();
    match vault
        .certs
        .iter_mut()
        .find(|c| c.name.eq_ignore_ascii_case(name))
    {
        Some(c) => {
            c.key_size = ver.key_size;
            if let Some(ct) = content_type {
                c.content_type = ct;
            }
            c.versions.push(ver);
            c.clone()
        }
        None => {
            let c = Cert {
                name: name.to_owned(),
                key_size: ver.key_size,
                subject_cn,
                validity_days: u32::try_from((ver.expires - ver.not_before) / 86_400)
                    .unwrap_or(365),
                content_type: content_type.unwrap_or_else(|| "application/x-pkcs12".to_owned()),
                versions: vec![ver],
            };
            vault.certs.push(c.clone());
            c
        }
    }
}

/// Refuses operations on disabled, not-yet-valid or expired versions.
fn usable(ver: &CertVersion, op: &str, now: i64) -> Result<(), Response> {
    if !ver.enabled {
        // As Key Vault: `Forbidden`, told apart from a missing role by its inner code.
        return Err((
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": {
                "code": "Forbidden",
                "message": format!("Operation {op} is not allowed on a disabled key."),
                "innererror": {"code": "KeyDisabled"},
            }})),
        )
            .into_response());
    }
    // As Key Vault words its secrets' (`SecretExpired`, "Operation get is not allowed on a
    // expired secret."): `Forbidden` with an inner code naming why, so that the refusal is
    // not taken for a missing role. The key's codes are worded likewise.
    let outside = if now > ver.expires {
        Some(("KeyExpired", "an expired key"))
    } else if now < ver.not_before {
        Some(("KeyNotYetValid", "a key that is not yet valid"))
    } else {
        None
    };
    if let Some((inner, what)) = outside {
        return Err((
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": {
                "code": "Forbidden",
                "message": format!("Operation {op} is not allowed on {what}."),
                "innererror": {"code": inner},
            }})),
        )
            .into_response());
    }
    Ok(())
}

fn key_not_found(name: &str, version: Option<&str>) -> Response {
    let id = match version {
        Some(v) if !v.is_empty() => format!("{name}/{v}"),
        _ => name.to_owned(),
    };
    kv_error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        &format!(
            "A key with (name/id) {id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
    )
}

fn cert_not_found(name: &str, version: Option<&str>) -> Response {
    let id = match version {
        Some(v) if !v.is_empty() => format!("{name}/{v}"),
        _ => name.to_owned(),
    };
    kv_error(
        StatusCode::NOT_FOUND,
        "CertificateNotFound",
        &format!(
            "A certificate with (name/id) {id} was not found in this key vault. If you recently deleted this certificate you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
    )
}

fn attributes(ver: &CertVersion) -> Value {
    json!({
        "enabled": ver.enabled,
        "nbf": ver.not_before,
        "exp": ver.expires,
        "created": ver.created,
        "updated": ver.created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    })
}

/// A CertificateBundle as `GET /certificates/{name}/{version}` returns it.
pub(crate) fn cert_bundle(base: &str, cert: &Cert, ver: &CertVersion) -> Value {
    let name = &cert.name;
    let created = cert.versions.first().map_or(ver.created, |v| v.created);
    json!({
        "id": format!("{base}/certificates/{name}/{}", ver.version),
        "kid": format!("{base}/keys/{name}/{}", ver.version),
        "sid": format!("{base}/secrets/{name}/{}", ver.version),
        "x5t": ver.x5t,
        "cer": b64std(&ver.der),
        "attributes": attributes(ver),
        "tags": {},
        "policy": {
            "id": format!("{base}/certificates/{name}/policy"),
            "key_props": {"exportable": false, "kty": "RSA", "key_size": cert.key_size, "reuse_key": false},
            "secret_props": {"contentType": cert.content_type},
            "x509_props": {
                "subject": format!("CN={}", cert.subject_cn),
                "sans": {},
                "ekus": ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"],
                "key_usage": ["digitalSignature", "keyEncipherment"],
                "validity_months": (cert.validity_days / 30).max(1),
                "basic_constraints": {"ca": false},
            },
            "lifetime_actions": [{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": "AutoRenew"}}],
            "issuer": {"name": "Self"},
            "attributes": {"enabled": true, "created": created, "updated": ver.created},
        },
    })
}
