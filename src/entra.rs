//! The Entra ID token exchange: `client_credentials` with a `jwt-bearer` client assertion at
//! `{authority}/{tenant}/oauth2/v2.0/token`, and the classification of Entra's errors
//! (AADSTS codes) into retryable, caller's fault and configuration's fault.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use url::Url;

use crate::sensitive::Sensitive;

/// One exchange: everything Entra needs, the assertion kept sensitive.
#[derive(Debug)]
pub struct ExchangeRequest<'a> {
    pub token_endpoint: &'a Url,
    pub client_id: &'a str,
    pub scope: &'a str,
    pub assertion: &'a Sensitive,
    /// Sent as `client-request-id`, so Entra's logs and ours share an id.
    pub correlation_id: uuid::Uuid,
    /// The `claims` parameter (JSON), when the tenant declares client capabilities or a
    /// caller passed a claims challenge (`claims::request_parameter`); at most
    /// `MAX_CLAIMS_PARAM` bytes.
    pub claims: Option<&'a str>,
}

/// The longest `claims` parameter sent: a caller's challenge (`claims::MAX_CLAIMS_LEN`) with
/// the client capabilities added.
pub const MAX_CLAIMS_PARAM: usize = crate::claims::MAX_CLAIMS_LEN + 1024;

/// A successful answer.
#[derive(Debug, Clone)]
pub struct EntraToken {
    pub access_token: Sensitive,
    /// Always `Bearer` (an answer with another is refused): no string kept per token.
    pub token_type: &'static str,
    pub expires_in: Duration,
    /// Entra's hint for when to refresh (not always sent).
    pub refresh_in: Option<Duration>,
}

/// Who has to act on an Entra failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntraErrorClass {
    /// Transient: throttling, outage, timeouts. Retry with backoff.
    Retryable,
    /// The request was wrong (scope): the caller must change it.
    Caller,
    /// The tenant/app/certificate configuration is wrong: an operator must fix it.
    Configuration,
    /// The assertion was outside its time window: retry once with a fresh one, then check clocks.
    Clock,
    /// The assertion's key or signature was refused: refresh certificate metadata and retry once.
    KeyRejected,
}

/// Entra's error, as much of it as a person needs to act on.
#[derive(Debug, Clone)]
pub struct EntraError {
    pub class: EntraErrorClass,
    /// HTTP status, 0 for transport errors.
    pub status: u16,
    /// OAuth `error` (`invalid_client`), or a transport error kind.
    pub error: String,
    pub codes: Vec<u32>,
    /// First sentence(s) of `error_description`, without trace and correlation boilerplate.
    pub description: String,
    pub correlation_id: Option<String>,
    pub trace_id: Option<String>,
    pub retry_after: Option<Duration>,
}

impl EntraError {
    pub fn aadsts(&self) -> Option<String> {
        self.codes.first().map(|c| format!("AADSTS{c}"))
    }

    /// No answer: `correlation` is the `client-request-id` sent, for an operator to quote
    /// (Entra may have logged the request although its answer never came).
    fn transport(message: String, correlation: &str) -> Self {
        EntraError {
            class: EntraErrorClass::Retryable,
            status: 0,
            error: "transport".into(),
            codes: vec![],
            description: message,
            correlation_id: Some(correlation.to_owned()),
            trace_id: None,
            retry_after: None,
        }
    }
}

impl EntraError {
    /// The head of an answer came (with `status`) but its body could not be read: it broke
    /// off (the connection broke, or the outbound timeout passed mid-body), or it ran past
    /// `ANSWER_LIMIT`, more than any answer of Entra's (a few KiB), so a proxy's or gateway's.
    /// Either way the next attempt may well get Entra's whole answer.
    fn unreadable_body(status: u16, e: crate::outbound::OutboundError, correlation: &str) -> Self {
        let (error, description) = match e {
            crate::outbound::OutboundError::Body(cause) => (
                "incomplete_response",
                format!(
                    "the answer's body broke off ({cause}): a proxy or the network may be cutting connections, or outbound.request_timeout_secs is shorter than Entra takes"
                ),
            ),
            other => (
                "oversized_response",
                format!(
                    "{other}, more than any answer of Entra's: a proxy or gateway answered, or the authority host is not Entra's"
                ),
            ),
        };
        EntraError {
            class: EntraErrorClass::Retryable,
            status,
            error: error.into(),
            codes: vec![],
            description,
            correlation_id: Some(correlation.to_owned()),
            trace_id: None,
            retry_after: None,
        }
    }
}

impl EntraError {
    /// A redirect (3xx) in answer to a token request, not followed: Entra's token endpoint
    /// never redirects, so something else answered. A temporary one (a proxy sending the
    /// broker to its sign-in page, say) is retried; a permanent one (301, 308) says the
    /// authority host is not Entra's token endpoint, the configuration's to fix (`error`
    /// `redirect`). Named with its target (`location`, resolved against `base`, the URL
    /// asked), of which only the scheme, host, port and path are shown: its query could
    /// carry anything the answerer put there.
    pub fn redirect(
        status: u16,
        location: Option<&str>,
        base: Option<&Url>,
        correlation: Option<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let target = crate::outbound::redirect_target(location, base);
        let permanent = crate::outbound::permanent_redirect(status);
        let (class, why) = if permanent {
            (
                EntraErrorClass::Configuration,
                "the authority host is not Entra's token endpoint",
            )
        } else {
            (
                EntraErrorClass::Retryable,
                "a proxy or gateway answered (sending the broker to a sign-in of its own, say)",
            )
        };
        EntraError {
            class,
            status,
            error: "redirect".into(),
            codes: vec![],
            description: format!(
                "HTTP {status} redirect {target}, not followed (the assertion is sent to Entra only): Entra's token endpoint never redirects, so {why}"
            ),
            correlation_id: correlation,
            trace_id: None,
            retry_after,
        }
    }
}

impl fmt::Display for EntraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.status == 0 {
            // No answer: Entra not reached, not answering in time, or not asked at all
            // (the broker's breaker or budget held the call back).
            let what = match self.error.as_str() {
                "broker_backoff" | "claims_too_large" => "not called",
                "timeout" => "did not answer",
                _ => "unreachable",
            };
            write!(f, "Entra ID {what}: {}", self.description)?;
            if let Some(c) = &self.correlation_id {
                write!(f, " [client-request-id {c}]")?;
            }
            return Ok(());
        }
        write!(f, "Entra ID answered {} {}", self.status, self.error)?;
        if let Some(code) = self.aadsts() {
            write!(f, " ({code})")?;
        }
        write!(f, ": {}", self.description)?;
        if let Some(c) = &self.correlation_id {
            write!(f, " [correlation id {c}")?;
            if let Some(t) = &self.trace_id {
                write!(f, ", trace id {t}")?;
            }
            write!(f, "]")?;
        }
        Ok(())
    }
}

impl std::error::Error for EntraError {}

/// The exchange seam, so tests can inject Entra behaviour.
#[async_trait]
pub trait TokenExchange: Send + Sync + fmt::Debug + 'static {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError>;
}

/// The token endpoint of a tenant under an authority host.
pub fn token_endpoint(authority: &Url, tenant_id: &str) -> Url {
    let mut u = authority.clone();
    let base = u.path().trim_end_matches('/').to_owned();
    u.set_path(&format!("{base}/{tenant_id}/oauth2/v2.0/token"));
    u.set_query(None);
    u
}

/// Classifies an answer: throttling and outages (408, 429, 5xx, `temporarily_unavailable`)
/// are retried whatever code their page carries, as they are no verdict on the request (and
/// one remembered as the configuration's fault would outlast the outage); any other answer
/// by its AADSTS code first (Entra's stable contract), then by its status.
pub fn classify(status: u16, error: &str, codes: &[u32]) -> EntraErrorClass {
    use EntraErrorClass::*;
    if matches!(status, 408 | 429 | 500..=599) || error == "temporarily_unavailable" {
        return Retryable;
    }
    for code in codes {
        match code {
            700027 => return KeyRejected,
            700024 => return Clock,
            70011 | 1002012 | 700022 | 700023 | 500011 => return Caller,
            90002 | 700016 | 7000229 | 7000112 | 700211 | 700212 | 700213 | 53003 | 50049
            | 7000215 | 7000222 | 700025 | 50034 | 900023 => return Configuration,
            50033 | 90006 | 90024 | 90033 | 90055 | 50196 => return Retryable,
            _ => {}
        }
    }
    match error {
        "invalid_scope" => Caller,
        _ => Configuration,
    }
}

/// The longest access-token lifetime Entra issues (a token lifetime policy allows at most a
/// day). A longer `expires_in` is capped: caching a token for less than its life is safe,
/// and an absurd value would otherwise overflow the expiry time.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest access-token lifetime taken as Entra's: it issues tokens for an hour or so,
/// and a token lifetime policy for no less than 10 minutes. A shorter `expires_in` (0, say)
/// is some other answerer's: cached, such a token would serve nobody (it is gone before the
/// safety margin), and callers asking for no minimum validity would be told to ask for less.
pub const MIN_LIFETIME: Duration = Duration::from_secs(5 * 60);

#[derive(Deserialize)]
struct SuccessBody {
    access_token: String,
    token_type: Option<String>,
    /// A number, or a numeric string as ADFS and the v1 endpoints send it.
    #[serde(deserialize_with = "seconds")]
    expires_in: u64,
    /// Only a hint: absent, or anything but a number of seconds, it is ignored.
    #[serde(default, deserialize_with = "hint_seconds")]
    refresh_in: Option<u64>,
}

/// Whole seconds from a JSON number or a numeric string (fractions dropped).
fn seconds_of(v: &serde_json::Value) -> Option<u64> {
    // A fraction is cut to whole seconds; negative, infinite or NaN is no number of seconds.
    let whole = |f: f64| (f.is_finite() && f >= 0.0).then_some(f as u64);
    match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().and_then(whole)),
        serde_json::Value::String(s) => {
            let s = s.trim();
            s.parse::<u64>()
                .ok()
                .or_else(|| s.parse::<f64>().ok().and_then(whole))
        }
        _ => None,
    }
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    seconds_of(&v).ok_or_else(|| serde::de::Error::custom("expires_in is not a number of seconds"))
}

fn hint_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(seconds_of(&v))
}

/// A successful answer's body as a bearer token (its lifetime capped at `MAX_LIFETIME`), or
/// what is wrong with it, for people: a body Entra would not send (an empty token, another
/// token type: a proxy's or gateway's) is no token to cache and hand to callers as a bearer.
fn token_from(body: &[u8]) -> Result<EntraToken, String> {
    let ok: SuccessBody =
        serde_json::from_slice(body).map_err(|e| format!("unreadable token response: {e}"))?;
    if ok.access_token.is_empty() {
        return Err("the token response's access_token is empty".into());
    }
    // Absent, Entra's bearer all the same (as it always is in this flow); anything else, a
    // token the callers could not use as one. Quoted only as a short word: it comes from
    // the network.
    let token_type = ok.token_type.unwrap_or_else(|| "Bearer".into());
    if !token_type.eq_ignore_ascii_case("bearer") {
        let shown = if !token_type.is_empty()
            && token_type.len() <= 32
            && token_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/'))
        {
            format!("`{token_type}`")
        } else {
            "not a word".into()
        };
        return Err(format!(
            "the token response's token_type is {shown}, not Bearer: a proxy or gateway may have answered"
        ));
    }
    if ok.expires_in < MIN_LIFETIME.as_secs() {
        return Err(format!(
            "the token response's expires_in is {}s, shorter than any token Entra issues (10 minutes at the least): a proxy or gateway may have answered",
            ok.expires_in
        ));
    }
    if ok.expires_in > MAX_LIFETIME.as_secs() {
        tracing::warn!(
            expires_in = ok.expires_in,
            "Entra token lifetime above a day; it is treated as a day"
        );
    }
    Ok(EntraToken {
        access_token: Sensitive::new(ok.access_token),
        token_type: "Bearer",
        expires_in: Duration::from_secs(ok.expires_in).min(MAX_LIFETIME),
        refresh_in: ok.refresh_in.map(Duration::from_secs),
    })
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u32>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
}

/// The broker's own small Entra client over the shared HTTP stack. Unlike the SDK's
/// `ClientAssertionCredential` it keeps one tenant per call, Entra's error body and
/// `refresh_in`, and holds no lock across the network.
#[derive(Debug, Clone)]
pub struct HttpTokenExchange {
    http: reqwest::Client,
}

impl HttpTokenExchange {
    pub fn new(http: reqwest::Client) -> Self {
        HttpTokenExchange { http }
    }
}

#[async_trait]
impl TokenExchange for HttpTokenExchange {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", req.client_id),
            ("scope", req.scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", req.assertion.expose()),
        ];
        let correlation = req.correlation_id.to_string();
        if let Some(c) = req.claims
            && c.len() > MAX_CLAIMS_PARAM
        {
            // Bounded where a challenge is read (the API), so only a bug gets here.
            return Err(EntraError {
                class: EntraErrorClass::Caller,
                status: 0,
                error: "claims_too_large".into(),
                codes: vec![],
                description: format!(
                    "the claims request is {} bytes, more than the {MAX_CLAIMS_PARAM} sent at most",
                    c.len()
                ),
                correlation_id: None,
                trace_id: None,
                retry_after: None,
            });
        }
        // Sent as reqwest's `form` would, in a body that tells when it is written.
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .extend_pairs(req.claims.map(|c| ("claims", c)))
            .finish();
        let resp = self
            .http
            .post(req.token_endpoint.clone())
            .header("client-request-id", &correlation)
            .header("return-client-request-id", "true")
            .header("accept", "application/json");
        let resp = crate::telemetry::trace_headers()
            .into_iter()
            .fold(resp, |r, (k, v)| r.header(k, v))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(crate::outbound::watched_body(body.into()))
            .send()
            .await
            // reqwest errors name the URL, never the form body.
            .map_err(|e| EntraError::transport(crate::outbound::error_chain(&e), &correlation))?;
        let status = resp.status().as_u16();
        let retry_after = crate::resilience::retry_after(
            |name| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            },
            std::time::SystemTime::now(),
        );
        if (300..400).contains(&status) {
            // reqwest follows no redirect (`outbound`): the assertion goes to Entra only.
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            return Err(EntraError::redirect(
                status,
                location,
                Some(req.token_endpoint),
                Some(correlation),
                retry_after,
            ));
        }
        let body = crate::outbound::body_within(resp, ANSWER_LIMIT)
            .await
            .map_err(|e| EntraError::unreadable_body(status, e, &correlation))?;
        if status == 200 {
            return token_from(&body).map_err(|e| EntraError {
                class: EntraErrorClass::Retryable,
                status,
                error: "invalid_response".into(),
                codes: vec![],
                description: e,
                correlation_id: Some(correlation.clone()),
                trace_id: None,
                retry_after: None,
            });
        }
        Err(error_from(
            status,
            &body,
            req.assertion.expose(),
            Some(correlation),
            retry_after,
        ))
    }
}

/// The longest answer read from the token endpoint: Entra's are a few KiB, so this bounds
/// only what a misbehaving proxy or gateway could make the broker hold in memory.
const ANSWER_LIMIT: usize = 1024 * 1024;

/// The longest OAuth `error` taken from a body (Entra's are words like `invalid_client`).
const ERROR_LIMIT: usize = 64;
/// The most AADSTS codes kept from a body (Entra sends one or two).
const CODES_LIMIT: usize = 8;

/// Entra's answer of `status` to a token request the SDK sent (the broker's own workload
/// identity's), read as the broker reads the answers to its own exchanges: Entra's verdict,
/// its fields bounded and classified, or a proxy's page named by its status alone. The body
/// must be without the assertion sent already (`outbound::ReadableEntraErrors` cuts it out).
pub fn answer_to_sdk(status: u16, body: &[u8], retry_after: Option<Duration>) -> EntraError {
    error_from(status, body, "", None, retry_after)
}

/// Entra's verdict in a failed answer's `body`, its fields bounded; or, when the body is not
/// Entra's, an error that says so without quoting it. `assertion`, the one sent, is cut out
/// of what is kept: a gateway answering in JSON may echo the request's form. `correlation`:
/// the `client-request-id` the broker sent, when it sent the request itself.
fn error_from(
    status: u16,
    body: &[u8],
    assertion: &str,
    correlation: Option<String>,
    retry_after: Option<Duration>,
) -> EntraError {
    let err = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .filter(|e| !e.error.is_empty() || !e.error_codes.is_empty())
        .filter(|e| e.error.is_empty() || oauth_error_code(&e.error));
    let Some(err) = err else {
        // Not Entra's verdict (a proxy's or gateway's page, or not a token endpoint):
        // nothing to remember as a configuration error; retried, behind the breaker.
        // The body is not quoted: it is not Entra's, and could echo the request.
        return EntraError {
            class: EntraErrorClass::Retryable,
            status,
            error: format!("http_{status}"),
            codes: vec![],
            description: format!(
                "HTTP {status} without an Entra error in the body: a proxy or gateway answered, or the authority host is not Entra's"
            ),
            correlation_id: correlation,
            trace_id: None,
            retry_after,
        };
    };
    let mut codes = err.error_codes;
    codes.truncate(CODES_LIMIT);
    // Cut out before the description is shortened, which could leave part of it.
    let description = if assertion.is_empty() {
        err.error_description
    } else {
        err.error_description.replace(assertion, "[the assertion]")
    };
    EntraError {
        class: classify(status, &err.error, &codes),
        status,
        error: if err.error.is_empty() {
            format!("http_{status}")
        } else {
            err.error
        },
        codes,
        description: clean_description(&description),
        correlation_id: err.correlation_id.filter(|c| request_id(c)).or(correlation),
        trace_id: err.trace_id.filter(|t| request_id(t)),
        retry_after,
    }
}

/// An OAuth error code (RFC 6749 §5.2): lower-case words joined by underscores.
fn oauth_error_code(e: &str) -> bool {
    e.len() <= ERROR_LIMIT && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// A correlation or trace id as Entra words them: a GUID, or at least hex and dashes.
fn request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Drops Entra's "Trace ID: … Correlation ID: … Timestamp: …" tail (kept separately).
fn clean_description(d: &str) -> String {
    let cut = d.find(" Trace ID:").or_else(|| d.find("\r\nTrace ID:"));
    let s = match cut {
        Some(i) => &d[..i],
        None => d,
    };
    s.trim().chars().take(600).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_endpoint_is_per_tenant_v2() {
        let a = Url::parse("https://login.microsoftonline.com").unwrap();
        assert_eq!(
            token_endpoint(&a, "contoso.onmicrosoft.com").as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let a = Url::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!(
            token_endpoint(&a, "t").as_str(),
            "https://127.0.0.1:8443/t/oauth2/v2.0/token"
        );
    }

    #[test]
    fn a_redirect_names_its_target_without_query_or_credentials_and_is_classed_by_permanence() {
        let asked = Url::parse("https://login.example/t/oauth2/v2.0/token").unwrap();
        let e = EntraError::redirect(
            302,
            Some("https://user:pw@sso.example.net:8443/login?return=SECRET#frag"),
            Some(&asked),
            None,
            None,
        );
        assert_eq!(e.class, EntraErrorClass::Retryable);
        let text = e.to_string();
        assert!(
            text.contains("HTTP 302 redirect to https://sso.example.net:8443/login, not followed"),
            "{text}"
        );
        assert!(
            !text.contains("SECRET") && !text.contains("pw") && !text.contains("frag"),
            "{text}"
        );
        // A relative target, resolved against the URL asked; a permanent redirect is the
        // configuration's.
        let e = EntraError::redirect(308, Some("/other/token"), Some(&asked), None, None);
        assert_eq!(e.class, EntraErrorClass::Configuration);
        assert!(
            e.to_string()
                .contains("redirect to https://login.example/other/token"),
            "{e}"
        );
        let e = EntraError::redirect(301, Some("::"), None, None, None);
        assert!(e.to_string().contains("to an unreadable Location"), "{e}");
    }

    #[test]
    fn classification_follows_aadsts_codes() {
        use EntraErrorClass::*;
        assert_eq!(classify(401, "invalid_client", &[700027]), KeyRejected);
        assert_eq!(classify(400, "invalid_client", &[700024]), Clock);
        assert_eq!(classify(400, "invalid_request", &[90002]), Configuration);
        assert_eq!(
            classify(400, "unauthorized_client", &[700016]),
            Configuration
        );
        assert_eq!(classify(400, "invalid_scope", &[1002012]), Caller);
        assert_eq!(classify(400, "invalid_scope", &[70011]), Caller);
        assert_eq!(classify(400, "invalid_request", &[7000112]), Configuration);
        // A code not listed is read by its status: a refusal (AADSTS7002138, a federated
        // subject matching only without regard to letter case) is configuration, an outage's
        // page (AADSTS50000 with a 5xx) is retried.
        assert_eq!(classify(400, "invalid_client", &[7002138]), Configuration);
        assert_eq!(classify(500, "server_error", &[50000]), Retryable);
        assert_eq!(classify(503, "", &[50000]), Retryable);
        // An outage's page is no verdict, whatever code it carries.
        assert_eq!(classify(503, "", &[700016]), Retryable);
        assert_eq!(classify(500, "server_error", &[700213]), Retryable);
        assert_eq!(classify(429, "invalid_client", &[7000112]), Retryable);
        assert_eq!(
            classify(400, "temporarily_unavailable", &[700016]),
            Retryable
        );
        assert_eq!(classify(400, "invalid_request", &[90055]), Retryable);
        assert_eq!(classify(503, "temporarily_unavailable", &[]), Retryable);
        assert_eq!(classify(429, "", &[]), Retryable);
        assert_eq!(classify(408, "", &[]), Retryable);
        assert_eq!(classify(400, "invalid_request", &[]), Configuration);
    }

    #[test]
    fn lifetimes_are_read_from_numbers_and_numeric_strings_and_a_bad_hint_is_ignored() {
        let read = |body: &str| token_from(body.as_bytes());
        let t = read(
            r#"{"access_token":"a","token_type":"Bearer","expires_in":3599,"refresh_in":1799}"#,
        )
        .unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        assert_eq!(t.refresh_in, Some(Duration::from_secs(1799)));
        // ADFS and the v1 endpoints: strings.
        let t = read(r#"{"access_token":"a","expires_in":"3599","refresh_in":"1799"}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        assert_eq!(t.refresh_in, Some(Duration::from_secs(1799)));
        assert_eq!(t.token_type, "Bearer");
        // A hint that is not a number of seconds is no hint.
        for hint in [r#""soon""#, "-5", "null", "{}", "true"] {
            let body = format!(r#"{{"access_token":"a","expires_in":3599,"refresh_in":{hint}}}"#);
            let t = read(&body).unwrap();
            assert_eq!(t.refresh_in, None, "{hint}");
        }
        assert_eq!(
            read(r#"{"access_token":"a","expires_in":3599.5}"#)
                .unwrap()
                .expires_in,
            Duration::from_secs(3599)
        );
        // Without a lifetime there is no token to cache.
        for bad in [
            r#"{"access_token":"a"}"#,
            r#"{"access_token":"a","expires_in":"an hour"}"#,
            r#"{"access_token":"a","expires_in":-1}"#,
        ] {
            let e = read(bad).unwrap_err();
            assert!(!e.to_string().contains("\"a\""), "{e}");
        }
        assert_eq!(
            read(r#"{"access_token":"a","expires_in":99999999999}"#)
                .unwrap()
                .expires_in,
            MAX_LIFETIME
        );
    }

    #[test]
    fn a_success_without_a_bearer_token_in_it_is_no_token() {
        for bad in [
            r#"{"access_token":"","token_type":"Bearer","expires_in":3599}"#,
            r#"{"access_token":"secret-a","token_type":"pop","expires_in":3599}"#,
            r#"{"access_token":"secret-a","token_type":"N/A","expires_in":3599}"#,
            r#"{"access_token":"secret-a","token_type":"","expires_in":3599}"#,
        ] {
            let e = token_from(bad.as_bytes()).map(|_| ()).unwrap_err();
            assert!(!e.to_string().contains("secret-a"), "{e}");
        }
        let long = format!(
            r#"{{"access_token":"a","token_type":"{}","expires_in":3599}}"#,
            "x".repeat(10_000)
        );
        let e = token_from(long.as_bytes()).map(|_| ()).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        // No lifetime to speak of.
        for secs in [0, 1, MIN_LIFETIME.as_secs() - 1] {
            let body = format!(r#"{{"access_token":"a","expires_in":{secs}}}"#);
            let e = token_from(body.as_bytes()).map(|_| ()).unwrap_err();
            assert!(e.contains(&format!("expires_in is {secs}s")), "{e}");
        }
        let body = format!(
            r#"{{"access_token":"a","expires_in":{}}}"#,
            MIN_LIFETIME.as_secs()
        );
        assert_eq!(
            token_from(body.as_bytes()).unwrap().expires_in,
            MIN_LIFETIME
        );
        // OAuth's token type is case-insensitive; callers get Entra's spelling.
        let t =
            token_from(br#"{"access_token":"a","token_type":"bearer","expires_in":3599}"#).unwrap();
        assert_eq!(t.token_type, "Bearer");
    }

    /// Exchanges once with the token endpoint at `url`: the error, and the id sent.
    async fn exchange_at(url: &str) -> (EntraError, String) {
        let endpoint = Url::parse(url).unwrap();
        let assertion = Sensitive::new(String::from("eyJassertion"));
        let correlation_id = uuid::Uuid::new_v4();
        let e = HttpTokenExchange::new(reqwest::Client::new())
            .exchange(ExchangeRequest {
                token_endpoint: &endpoint,
                client_id: "c",
                scope: "s",
                assertion: &assertion,
                correlation_id,
                claims: None,
            })
            .await
            .unwrap_err();
        (e, correlation_id.to_string())
    }

    /// A server answering every request with `status` and a body of `body`.
    async fn answering(status: u16, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        let app = axum::Router::new().fallback(move || async move { (status, body) });
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/t/oauth2/v2.0/token")
    }

    #[tokio::test]
    async fn an_answer_without_an_entra_error_is_retried_not_remembered_as_configuration() {
        for status in [404, 408, 413, 502] {
            let url = answering(status, "<html>Request Entity Too Large</html>").await;
            let (e, sent) = exchange_at(&url).await;
            assert_eq!(e.status, status);
            assert_eq!(e.class, EntraErrorClass::Retryable, "{status}: {e}");
            assert_eq!(e.correlation_id.as_deref(), Some(sent.as_str()));
            assert!(e.to_string().contains("without an Entra error"), "{e}");
            assert!(
                !e.to_string().contains("html"),
                "the page is not quoted: {e}"
            );
        }
        // Entra's own verdict is still classified by its code.
        let url = answering(
            400,
            r#"{"error":"unauthorized_client","error_description":"AADSTS7000112: Application is disabled.","error_codes":[7000112]}"#,
        )
        .await;
        let (e, _) = exchange_at(&url).await;
        assert_eq!(e.class, EntraErrorClass::Configuration, "{e}");
    }

    #[tokio::test]
    async fn a_request_that_got_no_answer_names_the_client_request_id_sent() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (e, sent) = exchange_at(&format!("http://127.0.0.1:{port}/t/oauth2/v2.0/token")).await;
        assert_eq!(e.status, 0);
        assert_eq!(e.class, EntraErrorClass::Retryable);
        assert!(
            e.to_string().contains(&format!("client-request-id {sent}")),
            "{e}"
        );
        assert!(!e.to_string().contains("eyJassertion"), "{e}");
    }

    const SENT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJl";

    fn error_of(status: u16, body: &str) -> EntraError {
        error_from(status, body.as_bytes(), SENT, Some("ours".into()), None)
    }

    #[test]
    fn the_oauth_error_is_kept_only_as_a_short_code() {
        let e = error_of(
            400,
            r#"{"error":"invalid_client","error_codes":[700027],"error_description":"AADSTS700027: bad."}"#,
        );
        assert_eq!(e.error, "invalid_client");
        assert_eq!(e.class, EntraErrorClass::KeyRejected);
        // Anything else in `error` is no OAuth error code: the body is not Entra's, and is
        // not quoted.
        let long = "x".repeat(ERROR_LIMIT + 1);
        for error in [long.as_str(), "Invalid Client", "<html>", "invalid-client"] {
            let body = serde_json::json!({"error": error, "error_codes": [700016]}).to_string();
            let e = error_of(400, &body);
            assert_eq!(e.class, EntraErrorClass::Retryable, "{error}: {e}");
            assert_eq!(e.error, "http_400");
            assert!(!e.to_string().contains(error), "{e}");
            assert!(e.to_string().contains("without an Entra error"), "{e}");
        }
    }

    #[test]
    fn an_echoed_assertion_is_cut_out_of_what_is_kept() {
        // A gateway answering in JSON, quoting the request's form in its description, near
        // its end: a cut to 600 characters first would leave the assertion's head.
        let body = serde_json::json!({
            "error": "invalid_request",
            "error_codes": [90014],
            "error_description": format!(
                "{} client_assertion={SENT}&client_id=c",
                "d".repeat(580)
            ),
            "trace_id": SENT,
            "correlation_id": format!("{SENT}-not-an-id"),
        })
        .to_string();
        let e = error_of(400, &body);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert_eq!(e.trace_id, None);
        assert_eq!(e.correlation_id.as_deref(), Some("ours"));
        let body = format!(
            r#"{{"error":"invalid_request","error_description":"form: client_assertion={SENT}"}}"#
        );
        assert_eq!(
            error_of(400, &body).description,
            "form: client_assertion=[the assertion]"
        );
        // Entra's own ids are kept, and only a few of many codes.
        let body = serde_json::json!({
            "error": "invalid_request",
            "error_codes": vec![90014; 1000],
            "trace_id": "2f8c6b1e-0c6f-4b5a-9e3d-000000000001",
            "correlation_id": "2f8c6b1e-0c6f-4b5a-9e3d-000000000002",
        })
        .to_string();
        let e = error_of(400, &body);
        assert_eq!(e.codes.len(), CODES_LIMIT);
        assert_eq!(
            e.trace_id.as_deref(),
            Some("2f8c6b1e-0c6f-4b5a-9e3d-000000000001")
        );
        assert_eq!(
            e.correlation_id.as_deref(),
            Some("2f8c6b1e-0c6f-4b5a-9e3d-000000000002")
        );
    }

    #[test]
    fn description_loses_its_trace_tail() {
        // Spaces (older answers) or CRLF (Entra's own) before the trace lines.
        for d in [
            "AADSTS700016: Application with identifier 'x' was not found. Trace ID: a Correlation ID: b Timestamp: c",
            "AADSTS700016: Application with identifier 'x' was not found.\r\nTrace ID: a\r\nCorrelation ID: b\r\nTimestamp: c",
        ] {
            assert_eq!(
                clean_description(d),
                "AADSTS700016: Application with identifier 'x' was not found."
            );
        }
    }
}
