//! A Microsoft Graph-style paged collection on the HTTPS listener, for demos and collector
//! tests: `GET /graph/v1.0/auditLogs/signIns` returns each tenant's deterministic sign-in log
//! in pages of `$top`, linked by `@odata.nextLink` with a `$skiptoken`, to callers holding an
//! access token the emulator issued for `https://graph.microsoft.com` in that tenant.
//!
//! Only what a log collector needs is emulated: bearer validation (signature with the
//! emulator's key, audience, lifetime on the emulator's clock, tenant and issuer), paging and
//! Graph's error shape. No `$filter`, `$select`, `$orderby` or permissions (`roles`) checks.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::keys::{self, SignAlg};
use super::state::Shared;

/// Graph's resource (audience) and its well-known app id.
pub(crate) const GRAPH_RESOURCE: &str = "https://graph.microsoft.com";
const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
const CLOCK_SKEW: i64 = 300;
const DEFAULT_TOP: u32 = 10;
/// Graph's largest page for sign-ins.
const MAX_TOP: u32 = 1000;
/// The newest record of every log is dated 2025-06-01T12:00:00Z; each older one a minute before.
const NEWEST_RECORD: i64 = 1_748_779_200;

const APPS: &[(&str, &str)] = &[
    ("de8bc8b5-d9f9-48b1-a8ad-b748da725064", "Graph Explorer"),
    (
        "00000002-0000-0ff1-ce00-000000000000",
        "Office 365 Exchange Online",
    ),
    (
        "00000003-0000-0ff1-ce00-000000000000",
        "Office 365 SharePoint Online",
    ),
    ("1fec8e78-bce4-4aaf-ab1b-5451cc387264", "Microsoft Teams"),
];
const PLACES: &[(&str, &str)] = &[
    ("Seattle", "US"),
    ("Dublin", "IE"),
    ("Amsterdam", "NL"),
    ("Singapore", "SG"),
    ("Sydney", "AU"),
];

pub(crate) async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let host = super::state::request_host(&parts);
    let base = format!("https://{host}/graph/v1.0");
    let ctx = Ctx {
        shared: &shared,
        request_id: parts
            .headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };

    let path = parts.uri.path().trim_start_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').collect();
    let is_sign_ins = matches!(segs.as_slice(), ["graph", "v1.0", a, b]
        if a.eq_ignore_ascii_case("auditLogs") && b.eq_ignore_ascii_case("signIns"));
    if !is_sign_ins {
        let segment = segs.get(2).copied().unwrap_or_default();
        return ctx.error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "Resource not found for the segment '{segment}'. The emulator serves only GET /graph/v1.0/auditLogs/signIns."
            ),
        );
    }
    if parts.method != Method::GET {
        return ctx.error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Request_BadRequest",
            &format!(
                "The method {} is not allowed on auditLogs/signIns.",
                parts.method
            ),
        );
    }

    let (counter_key, response) = match authenticate(&shared, &parts.headers) {
        Ok(tenant) => {
            let response = page(&ctx, &tenant, &base, parts.uri.query());
            (tenant.tenant_id, response)
        }
        Err(Refused {
            tenant,
            message,
            challenge,
        }) => (tenant, ctx.unauthorized(&message, challenge.as_deref())),
    };
    shared
        .counters()
        .graph
        .entry(counter_key)
        .or_default()
        .record(response.status().is_success());
    response
}

struct Ctx<'a> {
    shared: &'a Shared,
    request_id: Option<String>,
}

impl Ctx<'_> {
    /// Graph's error JSON, with `innerError.date` on the emulator's clock.
    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        let request_id = uuid::Uuid::new_v4().to_string();
        let date = self
            .shared
            .clock
            .now()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let body = json!({"error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": date,
                "request-id": request_id,
                "client-request-id": self.request_id.clone().unwrap_or_else(|| request_id.clone()),
            },
        }});
        self.respond(status, body, &request_id)
    }

    /// 401 with Graph's bearer challenge; with `claims` (base64), a continuous access
    /// evaluation claims challenge (`error="insufficient_claims"`).
    fn unauthorized(&self, message: &str, claims: Option<&str>) -> Response {
        let mut r = self.error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
        );
        let mut challenge = String::from(
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
        );
        if let Some(c) = claims {
            challenge.push_str(&format!(", error=\"insufficient_claims\", claims=\"{c}\""));
        }
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }

    fn respond(&self, status: StatusCode, body: Value, request_id: &str) -> Response {
        let mut r = (status, axum::Json(body)).into_response();
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("request-id", v);
        }
        if let Some(v) = self
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            h.insert("client-request-id", v);
        }
        r
    }
}

/// The tenant a valid token was issued in.
struct Tenant {
    tenant_id: String,
    domain: Option<String>,
    records: u32,
}

/// A token Graph refused: the counter key (the configured tenant the token names, else
/// `-`), Graph's message, and a claims challenge (base64) when continuous access evaluation
/// refused it.
struct Refused {
    tenant: String,
    message: String,
    challenge: Option<String>,
}

impl From<(String, String)> for Refused {
    fn from((tenant, message): (String, String)) -> Refused {
        Refused {
            tenant,
            message,
            challenge: None,
        }
    }
}

/// Validates the bearer token as Graph would. A CAE token (`xms_cc` holding `cp1`) of an
/// app disabled since is refused with a claims challenge, as CAE for workload identities
/// refuses it at once; other tokens of a disabled app are accepted until they expire.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Tenant, Refused> {
    let tenant = check_token(shared, headers).map_err(Refused::from)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, t)| t.trim())
        .and_then(keys::parse_jwt);
    let Some(jwt) = token else { return Ok(tenant) };
    let cae = jwt
        .claims
        .get("xms_cc")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|c| c.as_str() == Some("cp1")));
    let app = jwt
        .claim_str("appid")
        .or(jwt.claim_str("azp"))
        .unwrap_or_default();
    let disabled = {
        let state = shared.state();
        state.tenant(&tenant.tenant_id).is_some_and(|i| {
            state.tenants[i]
                .apps
                .iter()
                .any(|a| a.client_id.eq_ignore_ascii_case(app) && !a.enabled)
        })
    };
    if cae && disabled {
        use base64::Engine;
        let claims = json!({"access_token": {"nbf": {"essential": true, "value": shared.now_secs().to_string()}}});
        return Err(Refused {
            tenant: tenant.tenant_id,
            message: "Continuous access evaluation resulted in challenge with result: InteractionRequired and code: ServicePrincipalDisabled".into(),
            challenge: Some(
                base64::engine::general_purpose::STANDARD.encode(claims.to_string()),
            ),
        });
    }
    Ok(tenant)
}

/// Checks the bearer token's signature, lifetime, audience, tenant and issuer. On failure
/// returns the counter key (the configured tenant the token names, else `-`) and Graph's
/// message.
fn check_token(shared: &Shared, headers: &HeaderMap) -> Result<Tenant, (String, String)> {
    let unknown = |m: &str| ("-".to_owned(), m.to_owned());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unknown("Access token is empty."))?;
    let jwt = keys::parse_jwt(token)
        .ok_or_else(|| unknown("IDX14100: JWT is not well formed, there are no dots (.)."))?;
    // Count per configured tenant only, so a forged `tid` cannot add counter keys.
    let tenant = {
        let state = shared.state();
        jwt.claim_str("tid")
            .and_then(|tid| state.tenant(tid))
            .map(|i| {
                let t = &state.tenants[i];
                Tenant {
                    tenant_id: t.tenant_id.clone(),
                    domain: t.domain.clone(),
                    records: t.graph_records,
                }
            })
    };
    let key = tenant
        .as_ref()
        .map_or_else(|| "-".to_owned(), |t| t.tenant_id.clone());
    let deny = |m: &str| (key.clone(), m.to_owned());

    let signed_by_emulator = jwt.header_str("kid") == Some(shared.issuer.kid.as_str())
        && jwt.header_str("alg").and_then(SignAlg::parse) == Some(SignAlg::Rs256)
        && keys::verify_jws(
            &shared.issuer.public,
            SignAlg::Rs256,
            jwt.signing_input.as_bytes(),
            &jwt.signature,
        );
    if !signed_by_emulator {
        return Err(deny(
            "Access token validation failure. Signature validation failed: the key is unknown or the signature does not match.",
        ));
    }
    let now = shared.now_secs();
    if jwt
        .claim_i64("exp")
        .is_none_or(|exp| exp + CLOCK_SKEW < now)
    {
        return Err(deny("Lifetime validation failed, the token is expired."));
    }
    if jwt
        .claim_i64("nbf")
        .is_some_and(|nbf| nbf - CLOCK_SKEW > now)
    {
        return Err(deny(
            "Lifetime validation failed, the token is not yet valid.",
        ));
    }
    let aud_ok = jwt.audiences().iter().any(|a| {
        a.trim_end_matches('/').eq_ignore_ascii_case(GRAPH_RESOURCE)
            || a.eq_ignore_ascii_case(GRAPH_APP_ID)
    });
    if !aud_ok {
        return Err(deny(&format!(
            "Invalid audience '{}'. Expected {GRAPH_RESOURCE}.",
            jwt.audiences().join(", ")
        )));
    }
    let Some(tenant) = tenant else {
        return Err(deny(
            "Access token validation failure. The token's tenant (tid) is not a tenant of this emulator.",
        ));
    };
    let iss = jwt.claim_str("iss").unwrap_or_default();
    let tid = &tenant.tenant_id;
    if iss != super::state::v1_issuer(tid) && iss != shared.v2_issuer(tid) {
        return Err(deny(&format!(
            "Access token validation failure. Invalid issuer '{iss}'."
        )));
    }
    Ok(tenant)
}

/// `$top` and the offset from `$skiptoken`; Graph's message when either is invalid.
fn paging(query: Option<&str>, tenant_id: &str) -> Result<(u32, u32), String> {
    let mut top = DEFAULT_TOP;
    let mut skip = 0u32;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "$top" => {
                top = v
                    .parse::<u32>()
                    .ok()
                    .filter(|t| (1..=MAX_TOP).contains(t))
                    .ok_or_else(|| {
                        format!(
                            "Invalid page size specified: '{v}'. Must be between 1 and {MAX_TOP} inclusive."
                        )
                    })?;
            }
            "$skiptoken" => {
                skip = parse_skiptoken(&v, tenant_id).ok_or_else(|| {
                    "The $skiptoken is invalid or belongs to another tenant.".to_owned()
                })?;
            }
            _ => {}
        }
    }
    Ok((top, skip))
}

/// One page of the tenant's log.
fn page(ctx: &Ctx<'_>, tenant: &Tenant, base: &str, query: Option<&str>) -> Response {
    let (top, skip) = match paging(query, &tenant.tenant_id) {
        Ok(p) => p,
        Err(m) => return ctx.error(StatusCode::BAD_REQUEST, "BadRequest", &m),
    };
    let total = tenant.records;
    let end = skip.saturating_add(top).min(total);
    let value: Vec<Value> = (skip..end).map(|i| record(tenant, i)).collect();
    let mut body = json!({
        "@odata.context": format!("{base}/$metadata#auditLogs/signIns"),
        "value": value,
    });
    if end < total
        && let Value::Object(m) = &mut body
    {
        let next = format!(
            "{base}/auditLogs/signIns?$top={top}&$skiptoken={}",
            skiptoken(&tenant.tenant_id, end)
        );
        m.insert("@odata.nextLink".into(), next.into());
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    ctx.respond(StatusCode::OK, body, &request_id)
}

/// Opaque to clients: base64url of `v1|{tenant id}|{offset}`.
fn skiptoken(tenant_id: &str, offset: u32) -> String {
    keys::b64url(format!("v1|{tenant_id}|{offset}").as_bytes())
}

fn parse_skiptoken(token: &str, tenant_id: &str) -> Option<u32> {
    let raw = String::from_utf8(keys::b64url_decode(token)?).ok()?;
    let mut parts = raw.splitn(3, '|');
    (parts.next()? == "v1").then_some(())?;
    parts
        .next()?
        .eq_ignore_ascii_case(tenant_id)
        .then_some(())?;
    parts.next()?.parse().ok()
}

/// A stable GUID from a label.
fn derived_guid(label: &str) -> String {
    let digest = Sha256::digest(label.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Record `i` (0 = newest) of a tenant's sign-in log: the same on every call and every start.
fn record(tenant: &Tenant, i: u32) -> Value {
    let tid = &tenant.tenant_id;
    let domain = tenant.domain.as_deref().unwrap_or(tid);
    let n = usize::try_from(i).unwrap_or(0);
    let (app_id, app_name) = APPS[n % APPS.len()];
    let (city, country) = PLACES[n % PLACES.len()];
    let user = n % 7 + 1;
    let failed = i % 5 == 4;
    let created = time::OffsetDateTime::from_unix_timestamp(NEWEST_RECORD - i64::from(i) * 60)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    json!({
        "id": derived_guid(&format!("signin|{tid}|{i}")),
        "createdDateTime": created,
        "userDisplayName": format!("Demo User {user:02}"),
        "userPrincipalName": format!("user{user:02}@{domain}"),
        "userId": derived_guid(&format!("user|{tid}|{user}")),
        "appId": app_id,
        "appDisplayName": app_name,
        "ipAddress": format!("203.0.113.{}", i % 250 + 1),
        "clientAppUsed": "Browser",
        "correlationId": derived_guid(&format!("correlation|{tid}|{i}")),
        "conditionalAccessStatus": "notApplied",
        "isInteractive": true,
        "resourceDisplayName": "Microsoft Graph",
        "resourceId": GRAPH_APP_ID,
        "resourceTenantId": tid,
        "homeTenantId": tid,
        "status": if failed {
            json!({"errorCode": 50126, "failureReason": "Error validating credentials due to invalid username or password.", "additionalDetails": null})
        } else {
            json!({"errorCode": 0, "failureReason": "Other.", "additionalDetails": null})
        },
        "location": {"city": city, "state": null, "countryOrRegion": country},
    })
}
