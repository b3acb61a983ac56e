//! Managed identity endpoints on the plain-HTTP listener: the App Service shape
//! (`GET /msi/token`, `X-IDENTITY-HEADER`, `api-version=2019-08-01`) and the IMDS shape
//! (`GET /metadata/identity/oauth2/token`, `Metadata: true`). Both issue RS256 JWTs signed by
//! the emulator's issuer key, with the claims Azure's managed-identity tokens carry.
#![allow(
    clippy::result_large_err,
    reason = "early-return error responses are cold paths; boxing them buys nothing"
)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::config::IdentityConfig;
use super::state::{IssuedMiToken, Shared};

/// IMDS api-versions that serve identity tokens (2018-02-01, the first, and later ones:
/// the SDKs send 2018-02-01 or 2019-08-01).
const IMDS_API_VERSIONS: &[&str] = &[
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
    "2023-11-15",
    "2024-07-17",
    "2025-04-07",
];

/// Managed-identity tokens live about a day, as Azure's do (`token_lifetime_secs` changes it).
const MI_TOKEN_LIFETIME: i64 = 86_400;

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/msi/token", get(app_service))
        .route("/metadata/identity/oauth2/token", get(imds))
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "error_description": description})),
    )
        .into_response()
}

fn bad_request(description: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// The two endpoint shapes, which answer errors differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `{"error","error_description"}`.
    Imds,
    /// `{"statusCode","message","correlationId"}` with `X-CORRELATION-ID`, as App Service's
    /// (and Functions', Container Apps') identity endpoint answers.
    AppService,
}

impl Shape {
    fn refuse(self, status: StatusCode, code: &str, description: &str) -> Response {
        match self {
            Shape::Imds => error(status, code, description),
            Shape::AppService => {
                let correlation = uuid::Uuid::new_v4().to_string();
                let mut r = (
                    status,
                    axum::Json(json!({
                        "statusCode": status.as_u16(),
                        "message": description,
                        "correlationId": correlation,
                    })),
                )
                    .into_response();
                if let Ok(v) = axum::http::HeaderValue::from_str(&correlation) {
                    r.headers_mut().insert("x-correlation-id", v);
                }
                r
            }
        }
    }

    fn bad_request(self, description: &str) -> Response {
        self.refuse(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
}

async fn app_service(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let header_ok = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == shared.endpoints.identity_header);
    if !header_ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "The X-IDENTITY-HEADER request header is missing or does not match IDENTITY_HEADER.",
        );
    }
    match q.get("api-version").map(String::as_str) {
        Some("2019-08-01") => {}
        Some(other) => {
            return bad_request(&format!(
                "api-version '{other}' is not supported by this endpoint; use 2019-08-01"
            ));
        }
        None => return bad_request("Required api-version parameter not specified"),
    }
    let selector = [
        ("client_id", q.get("client_id")),
        ("object_id", q.get("principal_id").or(q.get("object_id"))),
        ("resource_id", q.get("mi_res_id")),
    ];
    let token = match issue(&shared, &q, &selector, Shape::AppService) {
        Ok(t) => t,
        Err(r) => return r,
    };
    axum::Json(json!({
        "access_token": token.access_token,
        "expires_on": token.expires_on.to_string(),
        "resource": token.resource,
        "token_type": "Bearer",
        "client_id": token.client_id,
    }))
    .into_response()
}

async fn imds(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let metadata_ok = headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true");
    if !metadata_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request_102",
            "Required metadata header not specified",
        );
    }
    match q.get("api-version").map(String::as_str) {
        None | Some("") => return bad_request("Required api-version parameter not specified"),
        Some(v) if !IMDS_API_VERSIONS.contains(&v) => {
            return bad_request(&format!(
                "Invalid or unsupported api-version '{v}'. Identity tokens need 2018-02-01 or a later version: {}",
                IMDS_API_VERSIONS.join(", ")
            ));
        }
        Some(_) => {}
    }
    let selector = [
        ("client_id", q.get("client_id")),
        ("object_id", q.get("object_id")),
        ("resource_id", q.get("msi_res_id").or(q.get("mi_res_id"))),
    ];
    let token = match issue(&shared, &q, &selector, Shape::Imds) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let s = |n: i64| n.to_string();
    axum::Json(json!({
        "access_token": token.access_token,
        "refresh_token": "",
        "expires_in": s(token.expires_in),
        "expires_on": s(token.expires_on),
        "ext_expires_in": s(token.expires_in),
        "not_before": s(token.not_before),
        "resource": token.resource,
        "token_type": "Bearer",
    }))
    .into_response()
}

struct MiToken {
    access_token: String,
    expires_on: i64,
    /// What is left of its life now (IMDS's `expires_in`).
    expires_in: i64,
    not_before: i64,
    resource: String,
    client_id: String,
}

fn issue(
    shared: &Shared,
    q: &HashMap<String, String>,
    selector: &[(&str, Option<&String>)],
    shape: Shape,
) -> Result<MiToken, Response> {
    let resource = q
        .get("resource")
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .ok_or_else(|| shape.bad_request("Required audience parameter not specified"))?;
    let identity = select(&shared.identities, selector, shape)?;
    let now = shared.now_secs();
    *shared
        .counters()
        .mi_tokens
        .entry(identity.name.clone())
        .or_default() += 1;
    let key = (identity.name.clone(), resource.to_owned());
    let answer = |t: &IssuedMiToken| MiToken {
        access_token: t.access_token.clone(),
        expires_on: t.expires_on,
        expires_in: t.expires_on - now,
        not_before: t.not_before,
        resource: resource.to_owned(),
        client_id: identity.client_id.clone(),
    };
    if let Some(t) = shared.state().mi_tokens.get(&key)
        && t.expires_on > now
    {
        return Ok(answer(t));
    }
    let lifetime = identity.token_lifetime_secs.map_or(MI_TOKEN_LIFETIME, |l| {
        i64::try_from(l).unwrap_or(MI_TOKEN_LIFETIME)
    });
    let exp = now + lifetime;
    let tid = &identity.tenant_id;
    let iss = shared.mi_issuer(tid, resource);
    let v2 = super::state::is_token_exchange(resource);
    let mut claims = json!({
        "aud": resource,
        "iss": iss,
        "iat": now,
        "nbf": now,
        "exp": exp,
        "aio": "emulator",
        "idp": super::state::v1_issuer(tid),
        "idtyp": "app",
        "oid": identity.object_id,
        "sub": identity.object_id,
        "tid": tid,
        "uti": uuid::Uuid::new_v4().simple().to_string(),
        "ver": if v2 { "2.0" } else { "1.0" },
        "xms_mirid": identity.resource_id(),
    });
    // The calling app: `azp` in v2.0 tokens, `appid` in v1.0 ones.
    if let serde_json::Value::Object(m) = &mut claims {
        let (app, acr) = if v2 {
            ("azp", "azpacr")
        } else {
            ("appid", "appidacr")
        };
        m.insert(app.into(), json!(identity.client_id));
        m.insert(acr.into(), json!("2"));
    }
    let access_token = shared.issuer.sign(&claims).map_err(|e| {
        tracing::error!(error = %e, "signing a managed-identity token failed");
        shape.refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unknown",
            "token signing failed",
        )
    })?;
    let issued = IssuedMiToken {
        access_token,
        not_before: now,
        expires_on: exp,
    };
    let token = answer(&issued);
    shared.state().mi_tokens.insert(key, issued);
    Ok(token)
}

/// Picks the identity: by the one selector given, else the system-assigned one, else (IMDS
/// only) the only user-assigned one. App Service names no user-assigned identity by itself,
/// and answers a selector it cannot resolve with "Unable to load the proper Managed Identity."
fn select<'a>(
    identities: &'a [IdentityConfig],
    selector: &[(&str, Option<&String>)],
    shape: Shape,
) -> Result<&'a IdentityConfig, Response> {
    let given: Vec<(&str, &String)> = selector
        .iter()
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let not_found = || match shape {
        Shape::Imds => bad_request("Identity not found"),
        Shape::AppService => shape.bad_request("Unable to load the proper Managed Identity."),
    };
    match given.as_slice() {
        [] => {
            if let Some(sa) = identities.iter().find(|i| i.system_assigned) {
                return Ok(sa);
            }
            match identities {
                _ if shape == Shape::AppService => Err(not_found()),
                [only] => Ok(only),
                [] => Err(not_found()),
                _ => Err(bad_request(
                    "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
                )),
            }
        }
        [(kind, value)] => identities
            .iter()
            .find(|i| match *kind {
                "client_id" => i.client_id.eq_ignore_ascii_case(value),
                "object_id" => i.object_id.eq_ignore_ascii_case(value),
                _ => i.resource_id().eq_ignore_ascii_case(value),
            })
            .ok_or_else(not_found),
        _ => {
            Err(shape
                .bad_request("Only one of client_id, object_id and msi_res_id may be specified"))
        }
    }
}
