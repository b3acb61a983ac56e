//! `tokenbroker check-config --online`: each tenant's whole path tried once from where the
//! broker runs (its managed identity, its network and trust, Key Vault or the HSM, the
//! tenant's Entra ID), before callers depend on it: onboarding a tenant, rotating a
//! certificate, moving the broker. A tenant is tried by asking for a token as a caller would
//! (the scopes given, else the tenant's pre-warm scopes, else Microsoft Graph's `/.default`
//! in the configured cloud); a failure reads as a caller would read it (the gRPC code and
//! the message naming the fix). Nothing is served and the tokens
//! are dropped; the report shows their fingerprints only.

use std::fmt::Write as _;
use std::time::Duration;

use futures::StreamExt as _;

use crate::broker::{Broker, BrokerError, TokenRequest, Upstreams};
use crate::config::Config;
use crate::sensitive::Fingerprint;

/// Tenants tried at once: enough to check a large estate in seconds, few enough not to
/// look like a burst to Key Vault.
const CONCURRENCY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("tenant `{name}` is not in the configuration (its tenants: {known})")]
    UnknownTenant { name: String, known: String },
}

/// One request tried for one tenant.
#[derive(Debug)]
pub struct TenantCheck {
    pub tenant: String,
    /// Empty when there was nothing to ask for.
    pub scopes: Vec<String>,
    pub outcome: Outcome,
}

#[derive(Debug)]
pub enum Outcome {
    Ok {
        valid_for: Duration,
        fingerprint: Fingerprint,
        /// Seconds until the signing certificate's end, for certificate credentials.
        certificate_ends_in: Option<f64>,
    },
    Failed {
        code: tonic::Code,
        message: String,
    },
    /// No scope was given, the tenant has none to pre-warm, and the cloud is a custom one.
    NotTried,
    /// No answer within the bound.
    TimedOut(Duration),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// How many tries got a token, failed (a refusal or no answer in time), were not tried.
fn counts(checks: &[TenantCheck]) -> (usize, usize, usize) {
    let count = |f: fn(&Outcome) -> bool| checks.iter().filter(|c| f(&c.outcome)).count();
    (
        count(Outcome::is_ok),
        count(|o| matches!(o, Outcome::Failed { .. } | Outcome::TimedOut(_))),
        count(|o| matches!(o, Outcome::NotTried)),
    )
}

/// Tries `tenants` (all when empty), each with `scopes`, or when none are given, with each
/// of its pre-warm scope sets; each try bounded by `bound`. In the order of their names.
pub async fn check(
    config: &Config,
    up: Upstreams,
    tenants: &[String],
    scopes: &[String],
    bound: Duration,
) -> Result<Vec<TenantCheck>, ProbeError> {
    for name in tenants {
        if !config.tenants.contains_key(name) {
            return Err(ProbeError::UnknownTenant {
                name: name.clone(),
                known: config
                    .tenants
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let broker = Broker::new(config, up);
    let tries = tries(config, tenants, scopes);
    let broker = &broker;
    let mut checks = futures::stream::iter(tries)
        .map(|(tenant, scopes)| async move {
            let outcome = if scopes.is_empty() {
                Outcome::NotTried
            } else {
                try_one(broker, &tenant, &scopes, bound).await
            };
            TenantCheck {
                tenant,
                scopes,
                outcome,
            }
        })
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    // The certificates as read by the tries, once for all of them.
    let ends: std::collections::HashMap<String, f64> =
        broker.flow().certificate_expiries().into_iter().collect();
    for c in &mut checks {
        if let Outcome::Ok {
            certificate_ends_in,
            ..
        } = &mut c.outcome
        {
            *certificate_ends_in = ends.get(&c.tenant).copied();
        }
    }
    Ok(checks)
}

/// What to ask for, per tenant: `scopes` when given, else each of the tenant's pre-warm
/// scope sets, else the cloud's Graph scope; nothing (not tried) in a custom cloud.
fn tries(config: &Config, tenants: &[String], scopes: &[String]) -> Vec<(String, Vec<String>)> {
    let fallback: Vec<String> = config
        .cloud
        .graph_scope()
        .map(|s| vec![s.to_owned()])
        .unwrap_or_default();
    let mut tries: Vec<(String, Vec<String>)> = Vec::new();
    for name in config.tenants.keys() {
        if !tenants.is_empty() && !tenants.contains(name) {
            continue;
        }
        if !scopes.is_empty() {
            tries.push((name.clone(), scopes.to_vec()));
            continue;
        }
        let before = tries.len();
        tries.extend(
            config
                .resilience
                .prewarm
                .iter()
                .filter(|p| &p.tenant == name)
                .map(|p| (name.clone(), p.scopes.clone())),
        );
        if tries.len() == before {
            tries.push((name.clone(), fallback.clone()));
        }
    }
    tries
}

async fn try_one(broker: &Broker, tenant: &str, scopes: &[String], bound: Duration) -> Outcome {
    let asked = broker.get_token(TokenRequest {
        tenant: tenant.to_owned(),
        scopes: scopes.to_vec(),
        min_validity: None,
        force_refresh: false,
        claims: None,
    });
    match tokio::time::timeout(bound, asked).await {
        Err(_) => Outcome::TimedOut(bound),
        Ok(Err(mut e)) => {
            // The check's broker ends with it: what it remembers is no one's concern.
            if let BrokerError::Upstream { remembered, .. } = &mut e {
                *remembered = None;
            }
            let status = crate::api::error::to_status(&e);
            Outcome::Failed {
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
        Ok(Ok(issued)) => Outcome::Ok {
            valid_for: issued.token.remaining(broker.clock().moment()),
            fingerprint: issued.token.fingerprint,
            // Filled in by `check` once every try is done.
            certificate_ends_in: None,
        },
    }
}

/// The report: a line per try, then the counts.
pub fn report(checks: &[TenantCheck]) -> String {
    let width = checks.iter().map(|c| c.tenant.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        let scopes = c.scopes.join(" ");
        let _ = match &c.outcome {
            Outcome::Ok {
                valid_for,
                fingerprint,
                certificate_ends_in,
            } => {
                let cert = match certificate_ends_in {
                    None => String::new(),
                    Some(s) => {
                        let days = s / 86_400.0;
                        // Called out as the broker warns at each read of the certificate.
                        let note = if *s < crate::flow::EXPIRY_WARNING.as_secs_f64() {
                            " (renew it soon)"
                        } else {
                            ""
                        };
                        format!("; signing certificate ends in {days:.0} days{note}")
                    }
                };
                writeln!(
                    out,
                    "{:<width$}  ok          {scopes}: token valid for {} s ({fingerprint}){cert}",
                    c.tenant,
                    valid_for.as_secs()
                )
            }
            Outcome::Failed { code, message } => {
                writeln!(
                    out,
                    "{:<width$}  FAILED      {scopes}: {code:?}: {message}",
                    c.tenant
                )
            }
            Outcome::TimedOut(bound) => {
                writeln!(
                    out,
                    "{:<width$}  FAILED      {scopes}: no answer within {} s (an upstream that does not answer, or retries under way: see the log)",
                    c.tenant,
                    bound.as_secs_f64()
                )
            }
            Outcome::NotTried => {
                writeln!(
                    out,
                    "{:<width$}  not tried   no scope to ask for in a custom cloud: give --scope, or pre-warm the tenant ([resilience] prewarm)",
                    c.tenant
                )
            }
        };
    }
    let (ok, failed, not_tried) = counts(checks);
    let _ = write!(out, "{ok} ok, {failed} failed, {not_tried} not tried");
    out
}

/// The report as one JSON document, for scripts: per try its `tenant`, `scopes` and
/// `outcome` (`ok`, `failed`, `timed_out`, `not_tried`) with what goes with it, then the counts.
pub fn report_json(checks: &[TenantCheck]) -> serde_json::Value {
    use serde_json::json;
    let tries: Vec<serde_json::Value> = checks
        .iter()
        .map(|c| {
            let mut v = json!({"tenant": c.tenant, "scopes": c.scopes});
            let extra = match &c.outcome {
                Outcome::Ok {
                    valid_for,
                    fingerprint,
                    certificate_ends_in,
                } => json!({
                    "outcome": "ok",
                    "valid_for_secs": valid_for.as_secs(),
                    "fingerprint": fingerprint,
                    "certificate_ends_in_secs": certificate_ends_in.map(|s| s.round() as i64),
                }),
                Outcome::Failed { code, message } => json!({
                    "outcome": "failed",
                    "code": format!("{code:?}"),
                    "message": message,
                }),
                Outcome::TimedOut(bound) => json!({
                    "outcome": "timed_out",
                    "bound_secs": bound.as_secs_f64(),
                }),
                Outcome::NotTried => json!({"outcome": "not_tried"}),
            };
            if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                v.extend(extra);
            }
            v
        })
        .collect();
    let (ok, failed, not_tried) = counts(checks);
    json!({"tenants": tries, "ok": ok, "failed": failed, "not_tried": not_tried})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_given_else_pre_warm_scopes_else_the_clouds_graph_scope() {
        let toml = |cloud: &str| {
            format!(
                r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true
[cloud]
{cloud}
[tenants.a]
tenant_id = "22222222-2222-2222-2222-222222222222"
client_id = "33333333-3333-3333-3333-333333333333"
credential = {{ type = "key_vault_certificate", vault_url = "https://v.vault.azure.net", certificate = "a" }}
[tenants.b]
tenant_id = "44444444-4444-4444-4444-444444444444"
client_id = "33333333-3333-3333-3333-333333333333"
credential = {{ type = "key_vault_certificate", vault_url = "https://v.vault.azure.net", certificate = "b" }}
[resilience]
prewarm = [{{ tenant = "a", scopes = ["api://x/.default"] }}, {{ tenant = "a", scopes = ["api://y/.default"] }}]
"#
            )
        };
        let config = |cloud: &str| {
            Config::from_toml_str(&toml(cloud), std::path::Path::new("/"), &|_| None).unwrap()
        };
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let public = config("name = \"public\"");
        assert_eq!(
            tries(&public, &[], &[]),
            [
                ("a".into(), s(&["api://x/.default"])),
                ("a".into(), s(&["api://y/.default"])),
                ("b".into(), s(&["https://graph.microsoft.com/.default"])),
            ]
        );
        assert_eq!(
            tries(&public, &s(&["b"]), &s(&["api://z/.default"])),
            [("b".into(), s(&["api://z/.default"]))]
        );
        let gov = config("name = \"us_gov\"");
        assert_eq!(
            tries(&gov, &s(&["b"]), &[])[0].1,
            s(&["https://graph.microsoft.us/.default"])
        );
        let custom = config("name = \"custom\"\nauthority_host = \"https://127.0.0.1:8443\"");
        assert_eq!(tries(&custom, &s(&["b"]), &[]), [("b".into(), vec![])]);
    }

    #[test]
    fn the_report_has_a_line_per_try_and_the_counts() {
        let checks = vec![
            TenantCheck {
                tenant: "contoso".into(),
                scopes: vec!["https://graph.microsoft.com/.default".into()],
                outcome: Outcome::Ok {
                    valid_for: Duration::from_secs(3599),
                    fingerprint: crate::sensitive::fingerprint(b"token"),
                    certificate_ends_in: Some(10.0 * 86_400.0),
                },
            },
            TenantCheck {
                tenant: "fabrikam-long".into(),
                scopes: vec!["api://x/.default".into()],
                outcome: Outcome::Failed {
                    code: tonic::Code::FailedPrecondition,
                    message: "tenant `fabrikam-long`: the fix".into(),
                },
            },
            TenantCheck {
                tenant: "n".into(),
                scopes: vec![],
                outcome: Outcome::NotTried,
            },
        ];
        let text = report(&checks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("contoso        ok "), "{text}");
        assert!(
            lines[0].contains("token valid for 3599 s (sha256:"),
            "{text}"
        );
        assert!(
            lines[0].ends_with("signing certificate ends in 10 days (renew it soon)"),
            "{text}"
        );
        assert!(
            lines[1].contains("FAILED      api://x/.default: FailedPrecondition: tenant"),
            "{text}"
        );
        assert!(lines[2].starts_with("n              not tried"), "{text}");
        assert_eq!(lines[3], "1 ok, 1 failed, 1 not tried");
        assert!(!text.contains("token\""));

        let json = report_json(&checks);
        assert_eq!(json["ok"], 1);
        assert_eq!(json["failed"], 1);
        assert_eq!(json["not_tried"], 1);
        let t = &json["tenants"];
        assert_eq!(t[0]["tenant"], "contoso");
        assert_eq!(t[0]["outcome"], "ok");
        assert_eq!(t[0]["valid_for_secs"], 3599);
        assert_eq!(t[0]["certificate_ends_in_secs"], 864_000);
        assert!(t[0]["fingerprint"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(t[1]["outcome"], "failed");
        assert_eq!(t[1]["code"], "FailedPrecondition");
        assert_eq!(t[1]["message"], "tenant `fabrikam-long`: the fix");
        assert_eq!(t[2]["outcome"], "not_tried");
        assert_eq!(t[2]["scopes"], serde_json::json!([]));
    }
}
