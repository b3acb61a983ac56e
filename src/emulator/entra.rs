//! Entra ID on the HTTPS listener: the client-credentials token endpoints (v2.0, and v1.0
//! with `resource=`) with certificate (`private_key_jwt`) and federated client assertions
//! (the emulator's managed-identity tokens, or tokens of an external OpenID issuer such as a
//! Kubernetes cluster's, whose keys `issuers` fetches), validated the way Entra does and
//! failing with its AADSTS codes; plus the discovery documents (OpenID configuration, JWKS,
//! MSAL's instance discovery) so any client can verify emulator tokens.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::config::FederatedCredentialConfig;
use super::issuers::{self, KeyError};
use super::keys::{self, SignAlg};
use super::state::{App, Shared};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const CLOCK_SKEW: i64 = 300;
/// Longest certificate-assertion lifetime accepted with strict assertions (Entra sets none;
/// it recommends 5-10 minutes).
const MAX_ASSERTION_LIFETIME: i64 = 3600;
const MAX_BODY: usize = 1 << 20;
/// Tokens living this long (seconds) or longer carry `refresh_in`.
const REFRESH_IN_FROM: i64 = 7200;

/// Entra's answers, each with an `x-ms-request-id` (an error's is its `trace_id`).
pub(crate) async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let mut response = route(shared, req).await;
    if !response.headers().contains_key(REQUEST_ID) {
        response
            .headers_mut()
            .insert(REQUEST_ID, fresh_request_id());
    }
    response
}

/// Header naming the request in the service's logs (Entra, Key Vault).
pub(crate) const REQUEST_ID: &str = "x-ms-request-id";

pub(crate) fn fresh_request_id() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-0000-0000-000000000000"))
}

async fn route(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let host = super::state::request_host(&parts);
    let base = format!("https://{host}");
    let path = parts.uri.path().trim_start_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').collect();
    let get = parts.method == Method::GET;
    match segs.as_slice() {
        [tenant, "oauth2", "v2.0", "token"] if parts.method == Method::POST => {
            let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
            };
            token(&shared, tenant, &base, &parts.headers, &body, Endpoint::V2).await
        }
        // The v1.0 endpoint, which the v1.0 discovery document names.
        [tenant, "oauth2", "token"] if parts.method == Method::POST => {
            let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
            };
            token(&shared, tenant, &base, &parts.headers, &body, Endpoint::V1).await
        }
        ["common", "discovery", "instance"] if get => instance_discovery(parts.uri.query(), &base),
        [tenant, "v2.0", ".well-known", "openid-configuration"] if get => {
            openid_configuration(&shared, tenant, &base, &parts.headers, true)
        }
        [tenant, ".well-known", "openid-configuration"] if get => {
            openid_configuration(&shared, tenant, &base, &parts.headers, false)
        }
        [_, "discovery", "v2.0", "keys"] | [_, "discovery", "keys"] if get => {
            axum::Json(shared.issuer.jwks()).into_response()
        }
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"error": "not_found", "error_description": format!("{} /{path} is not emulated", parts.method)}))).into_response(),
    }
}

/// The token endpoint called: v2.0 names the resource in `scope` (`{resource}/.default`) and
/// answers numbers; v1.0 names it in `resource` and answers every value as a string, with the
/// token's `expires_on`, `not_before` and `resource`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    V1,
    V2,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::V1 => "oauth2/token",
            Endpoint::V2 => "oauth2/v2.0/token",
        }
    }
}

/// An Entra error: OAuth `error`, AADSTS code and message (without the `AADSTSn: ` prefix).
pub(crate) struct EntraError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    message: String,
}

fn invalid_request(code: u32, message: impl Into<String>) -> EntraError {
    EntraError {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_request",
        code,
        message: message.into(),
    }
}
fn invalid_client(code: u32, message: impl Into<String>) -> EntraError {
    EntraError {
        status: StatusCode::UNAUTHORIZED,
        error: "invalid_client",
        code,
        message: message.into(),
    }
}
fn unauthorized_client(code: u32, message: impl Into<String>) -> EntraError {
    EntraError {
        status: StatusCode::BAD_REQUEST,
        error: "unauthorized_client",
        code,
        message: message.into(),
    }
}
fn invalid_scope(code: u32, message: impl Into<String>) -> EntraError {
    EntraError {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_scope",
        code,
        message: message.into(),
    }
}

/// Entra's error JSON; returns it with the correlation id used.
pub(crate) fn error_body(
    error: &str,
    code: u32,
    message: &str,
    correlation: Option<&str>,
    now: time::OffsetDateTime,
) -> (Value, String) {
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = correlation.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let ts = timestamp(now);
    let body = json!({
        "error": error,
        // Entra separates the message and its trace lines with CRLF.
        "error_description": format!("AADSTS{code}: {message}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {ts}"),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (body, correlation)
}

fn timestamp(t: time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn client_request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn respond(status: StatusCode, body: Value, request_id: Option<&str>) -> Response {
    // Entra's x-ms-request-id is the error's trace id.
    let trace = body
        .get("trace_id")
        .and_then(Value::as_str)
        .and_then(|t| HeaderValue::from_str(t).ok());
    let mut r = (status, axum::Json(body)).into_response();
    if let Some(t) = trace {
        r.headers_mut().insert(REQUEST_ID, t);
    }
    if let Some(id) = request_id
        && let Ok(v) = HeaderValue::from_str(id)
    {
        r.headers_mut().insert("client-request-id", v);
    }
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    r
}

async fn token(
    shared: &Shared,
    tenant_seg: &str,
    base: &str,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: Endpoint,
) -> Response {
    let request_id = client_request_id(headers);
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let mut counter_key = format!(
        "{tenant_seg}/{}",
        form.get("client_id").map_or("", String::as_str)
    );
    let result = exchange(shared, tenant_seg, base, &form, &mut counter_key, endpoint).await;
    shared
        .counters()
        .exchanges
        .entry(counter_key)
        .or_default()
        .record(result.is_ok());
    match result {
        Ok(body) => respond(StatusCode::OK, body, request_id.as_deref()),
        Err(e) => {
            let (body, _) = error_body(
                e.error,
                e.code,
                &e.message,
                request_id.as_deref(),
                shared.clock.now(),
            );
            respond(e.status, body, request_id.as_deref())
        }
    }
}

fn required<'a>(form: &'a HashMap<String, String>, name: &str) -> Result<&'a str, EntraError> {
    form.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            invalid_request(
                900144,
                format!("The request body must contain the following parameter: '{name}'."),
            )
        })
}

async fn exchange(
    shared: &Shared,
    tenant_seg: &str,
    base: &str,
    form: &HashMap<String, String>,
    counter_key: &mut String,
    endpoint: Endpoint,
) -> Result<Value, EntraError> {
    let (tenant_id, resources, apis, app_ids) = {
        let state = shared.state();
        let Some(ti) = state.tenant(tenant_seg) else {
            return Err(invalid_request(
                90002,
                format!(
                    "Tenant '{tenant_seg}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
                ),
            ));
        };
        let t = &state.tenants[ti];
        let app_ids: Vec<String> = t.apps.iter().map(|a| a.client_id.clone()).collect();
        (
            t.tenant_id.clone(),
            t.resources.clone(),
            t.apis.clone(),
            app_ids,
        )
    };

    let grant_type = required(form, "grant_type")?;
    if grant_type != "client_credentials" {
        return Err(EntraError {
            status: StatusCode::BAD_REQUEST,
            error: "unsupported_grant_type",
            code: 70003,
            message: format!("The app requested an unsupported grant type '{grant_type}'."),
        });
    }
    let client_id = required(form, "client_id")?;
    *counter_key = format!("{tenant_id}/{client_id}");
    let app = {
        let state = shared.state();
        state.tenant(&tenant_id).and_then(|ti| {
            state.tenants[ti]
                .apps
                .iter()
                .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
                .cloned()
        })
    };
    let Some(app) = app else {
        return Err(unauthorized_client(
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant_id}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    };
    let wanted = match endpoint {
        Endpoint::V2 => check_scope(form)?,
        Endpoint::V1 => check_resource(form)?,
    };
    let resource = resolve_resource(&wanted, &tenant_id, &resources, &apis, &app_ids)?;
    let cp1 = read_claims(shared, form, counter_key)?;

    if form.get("client_secret").is_some_and(|s| !s.is_empty()) {
        return Err(invalid_client(
            7000215,
            "Invalid client secret provided. (The emulator only supports certificate and federated credentials.)",
        ));
    }
    let assertion = form.get("client_assertion").filter(|a| !a.is_empty());
    let Some(assertion) = assertion else {
        return Err(invalid_client(
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    };
    match form.get("client_assertion_type").map(String::as_str) {
        Some(ASSERTION_TYPE) => {}
        None | Some("") => {
            return Err(invalid_request(
                900144,
                "The request body must contain the following parameter: 'client_assertion_type'.",
            ));
        }
        Some(other) => {
            return Err(invalid_request(
                900144,
                format!(
                    "The value of 'client_assertion_type' must be '{ASSERTION_TYPE}', got '{other}'."
                ),
            ));
        }
    }
    if !app.enabled {
        return Err(unauthorized_client(
            7000112,
            format!(
                "Application '{}'({}) is disabled.",
                app.client_id, app.display_name
            ),
        ));
    }

    let jwt = keys::parse_jwt(assertion)
        .ok_or_else(|| invalid_request(50027, "JWT token is invalid or malformed."))?;
    if jwt.header_str("kid") == Some(shared.issuer.kid.as_str()) {
        validate_federated(shared, &app, &jwt)?;
    } else if is_external(&jwt) {
        validate_external(shared, &app, &jwt).await?;
    } else {
        validate_certificate(shared, &app, &jwt, tenant_seg, &tenant_id, base, endpoint)?;
    }
    let issued = issue(shared, &app, &tenant_id, &resource, cp1)?;
    Ok(match endpoint {
        Endpoint::V2 => issued.body,
        Endpoint::V1 => v1_body(&issued, form.get("resource").map_or("", String::as_str)),
    })
}

/// The `claims` parameter (OpenID Connect's claims request), if sent: a JSON object, else
/// 9000410 as Entra answers malformed JSON. Recorded for the counters; whether it declares
/// the `cp1` client capability (`access_token.xms_cc.values`), which makes the token a CAE
/// token.
fn read_claims(
    shared: &Shared,
    form: &HashMap<String, String>,
    counter_key: &str,
) -> Result<bool, EntraError> {
    // An empty parameter is no claims request.
    let Some(text) = form.get("claims").filter(|c| !c.is_empty()) else {
        return Ok(false);
    };
    let claims = match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(invalid_request(9000410, "Malformed JSON.")),
    };
    let cp1 = claims
        .pointer("/access_token/xms_cc/values")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|c| c.as_str() == Some("cp1")));
    shared
        .counters()
        .claims
        .insert(counter_key.to_owned(), claims);
    Ok(cp1)
}

/// The resource a token is for, and the version of its tokens.
struct Audience {
    /// v1.0: the identifier as configured or asked for; v2.0: the API's client id.
    aud: String,
    v2: bool,
}

/// Checks the single `{resource}/.default` scope (v2.0) and returns the resource named.
fn check_scope(form: &HashMap<String, String>) -> Result<String, EntraError> {
    let scope = required(form, "scope")?;
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let resource_of = |s: &str| {
        s.rsplit_once('/')
            .map_or(s, |(r, _)| r)
            .trim_end_matches('/')
            .to_ascii_lowercase()
    };
    if scopes.len() > 1 {
        let mut distinct: Vec<String> = scopes.iter().map(|s| resource_of(s)).collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > 1 {
            return Err(invalid_scope(
                700022,
                format!(
                    "The provided value for the input parameter scope is not valid because it contains more than one resource. Scope {scope} is not valid."
                ),
            ));
        }
        return Err(invalid_scope(
            70011,
            format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        ));
    }
    let Some(resource) = scope.strip_suffix("/.default") else {
        return Err(invalid_scope(
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        ));
    };
    let wanted = resource.trim_end_matches('/');
    if wanted.is_empty() || wanted.contains(char::is_whitespace) {
        return Err(invalid_scope(
            70011,
            format!(
                "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        ));
    }
    Ok(wanted.to_owned())
}

/// The `resource` parameter of the v1.0 endpoint (which has no scopes: a `scope` sent with it
/// is ignored, as by Entra's v1.0 endpoint).
fn check_resource(form: &HashMap<String, String>) -> Result<String, EntraError> {
    Ok(required(form, "resource")?
        .trim()
        .trim_end_matches('/')
        .to_owned())
}

/// The resource as configured in the tenant, and the version of its tokens; unknown: 500011.
fn resolve_resource(
    wanted: &str,
    tenant_id: &str,
    resources: &[String],
    apis: &[super::config::ApiConfig],
    app_ids: &[String],
) -> Result<Audience, EntraError> {
    let api = apis.iter().find(|a| {
        a.uri.trim_end_matches('/').eq_ignore_ascii_case(wanted)
            || a.client_id.eq_ignore_ascii_case(wanted)
            || wanted.eq_ignore_ascii_case(&format!("api://{}", a.client_id))
    });
    if let Some(api) = api {
        let v2 = api.access_token_version == 2;
        return Ok(Audience {
            aud: if v2 {
                api.client_id.clone()
            } else {
                wanted.to_owned()
            },
            v2,
        });
    }
    let known = resources
        .iter()
        .find(|r| r.trim_end_matches('/').eq_ignore_ascii_case(wanted))
        .cloned()
        .or_else(|| {
            app_ids
                .iter()
                .find(|id| {
                    wanted.eq_ignore_ascii_case(id)
                        || wanted.eq_ignore_ascii_case(&format!("api://{id}"))
                })
                .map(|_| wanted.to_owned())
        });
    known.map(|aud| Audience { aud, v2: false }).ok_or_else(|| EntraError {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_resource",
        code: 500011,
        message: format!("The resource principal named {wanted} was not found in the tenant named {tenant_id}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."),
    })
}

fn std_to_url_b64(s: &str) -> String {
    s.trim_end_matches('=').replace('+', "-").replace('/', "_")
}

fn validate_certificate(
    shared: &Shared,
    app: &App,
    jwt: &keys::ParsedJwt,
    tenant_seg: &str,
    tenant_id: &str,
    base: &str,
    endpoint: Endpoint,
) -> Result<(), EntraError> {
    let alg_name = jwt.header_str("alg").unwrap_or_default();
    let Some(alg) = SignAlg::parse(alg_name) else {
        return Err(invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - Unsupported signing algorithm '{alg_name}'; use RS256 or PS256.]"
            ),
        ));
    };
    let by_s256 = jwt.header_str("x5t#S256").map(std_to_url_b64);
    let by_sha1 = jwt.header_str("x5t").map(std_to_url_b64);
    let key = app.keys.iter().find(|k| {
        by_s256.as_deref().is_some_and(|t| t == k.x5t_s256)
            || by_sha1.as_deref().is_some_and(|t| t == k.x5t)
    });
    let Some(key) = key else {
        let thumb = by_sha1
            .as_deref()
            .or(by_s256.as_deref())
            .and_then(keys::b64url_decode)
            .map(|b| b.iter().map(|x| format!("{x:02X}")).collect::<String>())
            .unwrap_or_default();
        return Err(invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '{thumb}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{}'.]",
                app.client_id
            ),
        ));
    };
    let now = shared.now_secs();
    if now < key.start || now > key.end {
        // As Entra writes them: 'Start=09/09/2026 17:51:32' (UTC).
        let when = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map(|t| {
                    format!(
                        "{:02}/{:02}/{} {:02}:{:02}:{:02}",
                        u8::from(t.month()),
                        t.day(),
                        t.year(),
                        t.hour(),
                        t.minute(),
                        t.second()
                    )
                })
                .unwrap_or_default()
        };
        return Err(invalid_client(
            700027,
            format!(
                "The certificate with identifier used to sign the client assertion is expired on application. [Reason - The key used is expired., Found key 'Start={}, End={}']",
                when(key.start),
                when(key.end)
            ),
        ));
    }
    if !keys::verify_jws(
        &key.public,
        alg,
        jwt.signing_input.as_bytes(),
        &jwt.signature,
    ) {
        return Err(invalid_client(
            700027,
            "Client assertion failed signature validation. [Reason - Key was found, but use of the key to verify the signature failed.]",
        ));
    }
    let iss = jwt.claim_str("iss").unwrap_or_default();
    let sub = jwt.claim_str("sub").unwrap_or_default();
    if !iss.eq_ignore_ascii_case(&app.client_id) || !sub.eq_ignore_ascii_case(&app.client_id) {
        return Err(invalid_client(
            700021,
            format!(
                "Client assertion application identifier doesn't match 'client_id' parameter. (iss '{iss}', sub '{sub}', client_id '{}')",
                app.client_id
            ),
        ));
    }
    // The token endpoint called, on the host it was called at: Entra refuses an assertion
    // addressed to another cloud's (or another host's) endpoint, so a client that names
    // the public cloud's host whatever its authority is caught here.
    let h = base.trim_start_matches("https://").to_ascii_lowercase();
    let aud_ok = jwt.audiences().iter().any(|aud| {
        let aud = aud.trim_end_matches('/').to_ascii_lowercase();
        [tenant_seg, tenant_id].iter().any(|t| {
            let t = t.to_ascii_lowercase();
            aud == format!("https://{h}/{t}/oauth2/v2.0/token")
                || aud == format!("https://{h}/{t}/oauth2/token")
        })
    });
    if !aud_ok {
        return Err(invalid_client(
            50013,
            format!(
                "Assertion is invalid. [Reason - The audience claim '{}' does not match the token endpoint '{base}/{tenant_seg}/{}'.]",
                jwt.audiences().join(", "),
                endpoint.path()
            ),
        ));
    }
    let now = shared.now_secs();
    let Some(exp) = jwt.claim_i64("exp") else {
        return Err(invalid_request(
            50027,
            "JWT token is invalid or malformed. [Reason - The assertion has no 'exp' claim.]",
        ));
    };
    let start = jwt.claim_i64("nbf").or(jwt.claim_i64("iat")).unwrap_or(now);
    let window = |extra: &str| {
        invalid_client(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, assertion valid from {start}, expiry time of assertion {exp}.{extra}"
            ),
        )
    };
    if exp + CLOCK_SKEW < now || start - CLOCK_SKEW > now {
        return Err(window(""));
    }
    let Some(jti) = jwt.claim_str("jti").filter(|j| !j.is_empty()) else {
        return Err(invalid_request(
            50027,
            "JWT token is invalid or malformed. [Reason - The assertion has no 'jti' claim.]",
        ));
    };
    let mut state = shared.state();
    if !state.strict_assertions {
        return Ok(());
    }
    if exp - start > MAX_ASSERTION_LIFETIME {
        return Err(window(
            " [Reason - With strict assertions, the emulator accepts certificate assertions living at most 1 hour.]",
        ));
    }
    if !state.remember_jti(&app.client_id, jti, exp + CLOCK_SKEW, now) {
        return Err(invalid_client(
            50013,
            format!(
                "Assertion is invalid. [Reason - The assertion with jti '{jti}' was already used (strict assertions).]"
            ),
        ));
    }
    Ok(())
}

/// A managed-identity token presented as a federated credential.
fn validate_federated(shared: &Shared, app: &App, jwt: &keys::ParsedJwt) -> Result<(), EntraError> {
    let alg = jwt.header_str("alg").and_then(SignAlg::parse);
    let ok = alg.is_some_and(|alg| {
        keys::verify_jws(
            &shared.issuer.public,
            alg,
            jwt.signing_input.as_bytes(),
            &jwt.signature,
        )
    });
    if !ok {
        return Err(invalid_client(
            700027,
            "Client assertion failed signature validation. [Reason - Key was found, but use of the key to verify the signature failed.]",
        ));
    }
    check_window(shared, jwt)?;
    let fics = fics_of_issuer(shared, app, jwt)?;
    check_audience_and_subject(&fics, jwt)
}

/// Whether an assertion that is not the emulator's own token comes from an external issuer
/// (a Kubernetes cluster's, say), to be matched against the app's federated credentials. A
/// certificate assertion is issued by the app itself (`iss` = its client id); a federated
/// credential's issuer is a URL.
fn is_external(jwt: &keys::ParsedJwt) -> bool {
    jwt.claim_str("iss").is_some_and(|iss| {
        let iss = iss.to_ascii_lowercase();
        iss.starts_with("https://") || iss.starts_with("http://")
    })
}

/// A token of an external OpenID issuer presented as a federated credential: the issuer must
/// be one the app's federated credentials name (only such an issuer is ever fetched), the
/// signature one of its published keys' (discovery document, then JWKS), then the checks of
/// the emulator's own federated tokens.
async fn validate_external(
    shared: &Shared,
    app: &App,
    jwt: &keys::ParsedJwt,
) -> Result<(), EntraError> {
    let fics = fics_of_issuer(shared, app, jwt)?;
    let iss = jwt.claim_str("iss").unwrap_or_default();
    let kid = jwt.header_str("kid");
    let alg = jwt.header_str("alg").unwrap_or_default();
    // Entra's answer when the issuer's metadata has no such key (AADSTS7000272); also the
    // emulator's when the metadata cannot be fetched at all.
    let key_not_found = |reason: String| {
        invalid_client(
            7000272,
            format!(
                "The certificate with identifier {} used to sign the federated credential could not be found in the metadata of identity provider {iss}. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token.{reason}",
                kid.unwrap_or("(none)")
            ),
        )
    };
    let key = match shared.issuers.key(iss, kid).await {
        Ok(k) => k,
        Err(KeyError::NotFound) => return Err(key_not_found(String::new())),
        Err(KeyError::Unavailable(why)) => {
            return Err(key_not_found(format!(
                " [Reason - The identity provider's metadata could not be retrieved: {why}]"
            )));
        }
    };
    let signature = keys::b64url(&jwt.signature);
    if !issuers::verify(&key, alg, jwt.signing_input.as_bytes(), &signature) {
        return Err(invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - Key was found, but use of the key to verify the signature failed., Algorithm '{alg}', issuer '{iss}']"
            ),
        ));
    }
    check_window(shared, jwt)?;
    check_audience_and_subject(&fics, jwt)
}

/// `exp` (required) and `nbf` of a federated assertion, with the skew: else 700024.
fn check_window(shared: &Shared, jwt: &keys::ParsedJwt) -> Result<(), EntraError> {
    let now = shared.now_secs();
    let exp = jwt.claim_i64("exp").unwrap_or(0);
    if exp + CLOCK_SKEW < now || jwt.claim_i64("nbf").is_some_and(|n| n - CLOCK_SKEW > now) {
        return Err(invalid_client(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, expiry time of assertion {exp}."
            ),
        ));
    }
    Ok(())
}

const FIC_HINT: &str = "Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation";

/// The app's federated credentials for the assertion's issuer (compared exactly, as
/// Entra does); none: 700211.
fn fics_of_issuer(
    shared: &Shared,
    app: &App,
    jwt: &keys::ParsedJwt,
) -> Result<Vec<FederatedCredentialConfig>, EntraError> {
    let iss = jwt.claim_str("iss").unwrap_or_default();
    let fics: Vec<_> = shared
        .federated_credentials(&app.fics)
        .into_iter()
        .filter(|f| f.issuer == iss)
        .collect();
    if fics.is_empty() {
        return Err(invalid_client(
            700211,
            format!(
                "No matching federated identity record found for presented assertion issuer '{iss}'. {FIC_HINT}"
            ),
        ));
    }
    Ok(fics)
}

/// Among the issuer's credentials, one for the assertion's audience (else 700212) and its
/// subject, case-sensitive as in Entra: else 7002138 when one matches if letter case is
/// ignored (Entra's answer since it stopped ignoring case), 700213 otherwise.
fn check_audience_and_subject(
    fics: &[FederatedCredentialConfig],
    jwt: &keys::ParsedJwt,
) -> Result<(), EntraError> {
    let sub = jwt.claim_str("sub").unwrap_or_default();
    let auds = jwt.audiences();
    let by_audience: Vec<_> = fics
        .iter()
        .filter(|f| auds.contains(&f.audience.as_str()))
        .collect();
    if by_audience.is_empty() {
        return Err(invalid_client(
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{}'. {FIC_HINT}",
                auds.join(", ")
            ),
        ));
    }
    if !by_audience.iter().any(|f| f.subject == sub) {
        if by_audience
            .iter()
            .any(|f| f.subject.to_lowercase() == sub.to_lowercase())
        {
            return Err(invalid_client(
                7002138,
                format!(
                    "No matching federated identity record found for presented assertion subject '{sub}'. The subject matches with case-insensitive comparison, but not with case-sensitive comparison. {FIC_HINT}"
                ),
            ));
        }
        return Err(invalid_client(
            700213,
            format!(
                "No matching federated identity record found for presented assertion subject '{sub}'. {FIC_HINT}"
            ),
        ));
    }
    Ok(())
}

/// A token issued: the v2.0 answer, and the token's window.
struct Issued {
    body: Value,
    not_before: i64,
    expires_on: i64,
}

/// An app-only access token of the resource's version: v1.0 and v2.0 differ in issuer,
/// audience form and the claim naming the calling app (`appid` / `azp`), as Entra's do.
fn issue(
    shared: &Shared,
    app: &App,
    tenant_id: &str,
    resource: &Audience,
    cp1: bool,
) -> Result<Issued, EntraError> {
    let [lo, hi] = if cp1 {
        app.cae_lifetime.unwrap_or(app.lifetime)
    } else {
        app.lifetime
    };
    let lifetime = i64::try_from(rand::random_range(lo..=hi)).unwrap_or(3600);
    let now = shared.now_secs();
    let v1_issuer = super::state::v1_issuer(tenant_id);
    let mut claims = json!({
        "aud": resource.aud,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "aio": "emulator",
        "idtyp": "app",
        "oid": app.sp_id,
        "sub": app.sp_id,
        "rh": "emulator",
        "tid": tenant_id,
        "uti": uuid::Uuid::new_v4().simple().to_string(),
    });
    if let Value::Object(m) = &mut claims {
        let version: [(&str, Value); 4] = if resource.v2 {
            [
                ("iss", json!(shared.v2_issuer(tenant_id))),
                ("azp", json!(app.client_id)),
                ("azpacr", json!("2")),
                ("ver", json!("2.0")),
            ]
        } else {
            [
                ("iss", json!(v1_issuer)),
                ("appid", json!(app.client_id)),
                ("appidacr", json!("2")),
                ("ver", json!("1.0")),
            ]
        };
        m.extend(version.map(|(k, v)| (k.to_owned(), v)));
        if !resource.v2 {
            m.insert("idp".into(), json!(v1_issuer));
        }
        if !app.roles.is_empty() {
            m.insert("roles".into(), json!(app.roles));
        }
        // The client capabilities of a CAE token, as Entra puts them in.
        if cp1 {
            m.insert("xms_cc".into(), json!(["cp1"]));
        }
    }
    let access_token = shared.issuer.sign(&claims).map_err(|e| EntraError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "server_error",
        code: 90033,
        message: format!("A transient error has occurred ({e})."),
    })?;
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    });
    // Entra hints a refresh at half the lifetime of tokens living 2 hours or more (MSAL
    // schedules its proactive refresh from it).
    if lifetime >= REFRESH_IN_FROM {
        body["refresh_in"] = json!(lifetime / 2);
    }
    Ok(Issued {
        body,
        not_before: now,
        expires_on: now + lifetime,
    })
}

/// The v1.0 endpoint's answer: every value a string (`expires_in`, `ext_expires_in`,
/// `expires_on`, `not_before`), with the `resource` as the client named it, as Entra's v1.0
/// endpoint (and ADAL, which reads it) has it; `refresh_in` is a v2.0 hint and is left out.
fn v1_body(issued: &Issued, resource: &str) -> Value {
    let lifetime = (issued.expires_on - issued.not_before).to_string();
    json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "expires_on": issued.expires_on.to_string(),
        "not_before": issued.not_before.to_string(),
        "resource": resource,
        "access_token": issued.body["access_token"],
    })
}

/// The tenant's OpenID configuration: v2.0 (`/{tenant}/v2.0/.well-known/…`), or v1.0
/// (`/{tenant}/.well-known/…`), whose issuer is the one v1.0 tokens carry.
fn openid_configuration(
    shared: &Shared,
    tenant_seg: &str,
    base: &str,
    headers: &HeaderMap,
    v2: bool,
) -> Response {
    let tenant_id = {
        let state = shared.state();
        match state.tenant(tenant_seg) {
            Some(i) => state.tenants[i].tenant_id.clone(),
            None if ["common", "organizations", "consumers"].contains(&tenant_seg) => {
                "{tenantid}".to_owned()
            }
            None => {
                let request_id = client_request_id(headers);
                let (body, _) = error_body(
                    "invalid_tenant",
                    90002,
                    &format!(
                        "Tenant '{tenant_seg}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                    ),
                    request_id.as_deref(),
                    shared.clock.now(),
                );
                return respond(StatusCode::BAD_REQUEST, body, request_id.as_deref());
            }
        }
    };
    let t = tenant_seg;
    if !v2 {
        return axum::Json(json!({
            "token_endpoint": format!("{base}/{t}/oauth2/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/common/discovery/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "scopes_supported": ["openid"],
            "issuer": super::state::v1_issuer(&tenant_id),
            "authorization_endpoint": format!("{base}/{t}/oauth2/authorize"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "amr", "nonce", "tid", "ver", "oid", "appid", "roles"],
            "cloud_instance_name": "microsoftonline.com",
        }))
        .into_response();
    }
    axum::Json(json!({
        "token_endpoint": format!("{base}/{t}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{t}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": shared.v2_issuer(&tenant_id),
        "request_uri_parameter_supported": false,
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "authorization_endpoint": format!("{base}/{t}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/{t}/oauth2/v2.0/devicecode"),
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "end_session_endpoint": format!("{base}/{t}/oauth2/v2.0/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver", "oid", "appid", "azp", "roles"],
        "kerberos_endpoint": format!("{base}/{t}/kerberos"),
        "tenant_region_scope": null,
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }))
    .into_response()
}

/// MSAL's instance discovery: vouches for the authority the client asked about. MSAL drops the
/// port when it builds `authorization_endpoint`, so the answer points at the host and port the
/// client used to reach this endpoint, with the tenant taken from `authorization_endpoint`.
fn instance_discovery(query: Option<&str>, base: &str) -> Response {
    let tenant = query
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "authorization_endpoint")
                .map(|(_, v)| v.into_owned())
        })
        .and_then(|a| url::Url::parse(&a).ok())
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next().map(str::to_owned))
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "common".to_owned());
    let host = base.trim_start_matches("https://");
    axum::Json(json!({
        "tenant_discovery_endpoint": format!("{base}/{tenant}/v2.0/.well-known/openid-configuration"),
        "api-version": "1.1",
        "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
    }))
    .into_response()
}
