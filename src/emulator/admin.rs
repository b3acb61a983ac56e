//! The admin API (plain HTTP, loopback): fault injection, counters, certificate rotation,
//! enabling/disabling apps, the clock offset, reset, health. For tests and demos; nothing here exists in Azure.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::faults::FaultSpec;
use super::keys;
use super::keyvault::add_version;
use super::state::Shared;

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/endpoints", get(endpoints))
        .route(
            "/faults",
            post(add_fault).get(list_faults).delete(clear_faults),
        )
        .route("/counters", get(counters))
        .route("/counters/reset", post(reset_counters))
        .route("/vaults/{vault}/certificates/{name}/rotate", post(rotate))
        .route(
            "/vaults/{vault}/certificates/{name}/versions/{version}/{action}",
            post(set_version_enabled),
        )
        .route(
            "/tenants/{tenant}/apps/{client_id}/{action}",
            post(set_app_enabled),
        )
        .route("/clock", get(clock))
        .route("/clock/advance", post(advance_clock))
        .route("/reset", post(reset))
}

fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": message.into()})),
    )
        .into_response()
}

fn not_found(message: impl Into<String>) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": message.into()})),
    )
        .into_response()
}

async fn endpoints(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.endpoints.clone()).into_response()
}

async fn add_fault(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let spec: FaultSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return bad_request(format!("invalid fault: {e}")),
    };
    let vaults: Vec<String> = shared
        .state()
        .vaults
        .iter()
        .map(|v| v.name.clone())
        .collect();
    match shared.faults.add(spec, &vaults) {
        Ok(id) => (StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn list_faults(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"faults": shared.faults.list()})).into_response()
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> Response {
    shared.faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn counters(State(shared): State<Arc<Shared>>) -> Response {
    let c = shared.counters().clone();
    axum::Json(c).into_response()
}

async fn reset_counters(State(shared): State<Arc<Shared>>) -> Response {
    shared.counters().reset();
    StatusCode::NO_CONTENT.into_response()
}

/// `{"offset_secs": total, "now": unix secs on the emulator's clock}`.
async fn clock(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({
        "offset_secs": offset_json(shared.clock.offset_ms()),
        "now": shared.now_secs(),
    }))
    .into_response()
}

/// Offsets are whole seconds in JSON unless advanced by a fraction.
fn offset_json(ms: i64) -> serde_json::Value {
    if ms % 1000 == 0 {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceRequest {
    seconds: serde_json::Number,
}

/// `{"seconds": N}` (N >= 0, integer or fractional) moves the clock forward, cumulatively.
async fn advance_clock(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: AdvanceRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad_request(format!(
                "invalid clock advance (expected {{\"seconds\": N}}): {e}"
            ));
        }
    };
    let ms = if let Some(s) = req.seconds.as_u64() {
        s.checked_mul(1000).and_then(|ms| i64::try_from(ms).ok())
    } else {
        req.seconds
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 9.0e15)
            .map(|s| (s * 1000.0).round() as i64)
    };
    let Some(ms) = ms else {
        return bad_request(format!(
            "seconds must be a non-negative number of seconds, got {}",
            req.seconds
        ));
    };
    let total = shared.clock.advance_ms(ms);
    axum::Json(json!({"offset_secs": offset_json(total)})).into_response()
}

async fn reset(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    #[serde(default = "yes")]
    register_on_apps: bool,
}

fn yes() -> bool {
    true
}

/// Creates a new current version with a fresh key, as a Key Vault auto-renewal would.
async fn rotate(
    State(shared): State<Arc<Shared>>,
    Path((vault, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let req: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest {
            register_on_apps: true,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return bad_request(format!("invalid rotate request: {e}")),
        }
    };
    let template = {
        let state = shared.state();
        state
            .vault_by_name(&vault)
            .and_then(|vi| state.vaults[vi].cert(&name))
            .map(|c| (c.subject_cn.clone(), c.key_size, c.validity_days))
    };
    let Some((subject, key_size, validity)) = template else {
        return not_found(format!("no certificate {vault}/{name}"));
    };
    let now = shared.clock.now();
    let generated = tokio::task::spawn_blocking(move || {
        keys::self_signed_version(&subject, key_size, validity, now)
    })
    .await;
    let ver = match generated {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    let mut state = shared.state();
    let Some(vi) = state.vault_by_name(&vault) else {
        return not_found(format!("no vault {vault}"));
    };
    let vault_name = state.vaults[vi].name.clone();
    let cert = add_version(&mut state, vi, &name, ver.clone(), None);
    let registered = if req.register_on_apps {
        state.register_version_on_apps(&vault_name, &cert.name, &ver)
    } else {
        0
    };
    axum::Json(json!({
        "version": ver.version,
        "x5t": ver.x5t,
        "x5t#S256": ver.x5t_s256,
        "registered_on_apps": registered,
    }))
    .into_response()
}

/// Disables or enables one version of a certificate and its key, as updating the version's
/// attributes in Key Vault does: signing with a disabled version is refused (`KeyDisabled`).
async fn set_version_enabled(
    State(shared): State<Arc<Shared>>,
    Path((vault, name, version, action)): Path<(String, String, String, String)>,
) -> Response {
    let enabled = match enabling(&action) {
        Ok(e) => e,
        Err(why) => return not_found(why),
    };
    let mut state = shared.state();
    let Some(vi) = state.vault_by_name(&vault) else {
        return not_found(format!("no vault {vault}"));
    };
    let Some(ver) = state.vaults[vi]
        .certs
        .iter_mut()
        .find(|c| c.name.eq_ignore_ascii_case(&name))
        .and_then(|c| c.versions.iter_mut().find(|v| v.version == version))
    else {
        return not_found(format!(
            "no version {version} of certificate {vault}/{name}"
        ));
    };
    ver.enabled = enabled;
    axum::Json(json!({"version": version, "enabled": enabled})).into_response()
}

/// Whether `action` (`enable` or `disable`) enables; any other is not a route.
fn enabling(action: &str) -> Result<bool, String> {
    match action {
        "enable" => Ok(true),
        "disable" => Ok(false),
        _ => Err(format!("unknown action {action}; use enable or disable")),
    }
}

async fn set_app_enabled(
    State(shared): State<Arc<Shared>>,
    Path((tenant, client_id, action)): Path<(String, String, String)>,
) -> Response {
    let enabled = match enabling(&action) {
        Ok(e) => e,
        Err(why) => return not_found(why),
    };
    let mut state = shared.state();
    let Some(ti) = state.tenant(&tenant) else {
        return not_found(format!("no tenant {tenant}"));
    };
    let Some(app) = state.tenants[ti]
        .apps
        .iter_mut()
        .find(|a| a.client_id.eq_ignore_ascii_case(&client_id))
    else {
        return not_found(format!("no app {client_id} in tenant {tenant}"));
    };
    app.enabled = enabled;
    axum::Json(json!({"client_id": app.client_id, "enabled": enabled})).into_response()
}
