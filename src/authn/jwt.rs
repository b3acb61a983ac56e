//! Bearer-JWT callers: verification against the signing keys each configured issuer publishes
//! (OpenID discovery document → `jwks_uri`), fetched through the broker's outbound client,
//! each document bounded in time and size (`MAX_ISSUER_DOCUMENT`).
//!
//! Checks, in order: size and shape; the issuer (`iss`) is configured; the header algorithm is
//! on that issuer's allow-list (asymmetric only: never `none`, never HMAC, so a public key can
//! never be used as an HMAC secret); the `kid` names a published key of a matching type; the
//! signature; `exp` and `nbf` with the issuer's leeway; `aud` is the broker's own audience.
//! An unknown `kid` triggers a key refresh at most once per `jwks_min_refresh` per issuer, so
//! forged tokens cannot make the broker hammer an issuer.
//!
//! A caller sends the same token with every request until it renews it, and checking the
//! signature costs more than the rest of a cache hit. A verified token is therefore
//! remembered (by its SHA-256, the token itself is not kept; bounded) until its `exp`, as
//! long as the issuer's keys it was verified against are the ones in use: when they are
//! fetched again (rotation, a key withdrawn, age), every token is verified again.
//!
//! Failed tokens are counted per client address (`limits::Buckets`): past the limit, new
//! tokens from that address are refused before any check, while its tokens that verified
//! before are still answered from memory. A signature check is charged to the address
//! before it is made and handed back when the token verifies, so bad tokens sent together
//! get no more signature checks than the burst.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{info, warn};
use url::Url;

use super::{Caller, Proof};
use crate::config::{IssuerConfig, RememberConfig};
use crate::limits::Buckets;
use crate::sensitive::Sensitive;

/// Longest bearer token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Bound of an issuer's discovery document and of its JWKS: an issuer publishes a few keys,
/// and one (or a proxy before it) answering endlessly must not fill the broker's memory
/// within the outbound time bound.
pub const MAX_ISSUER_DOCUMENT: usize = 256 * 1024;

/// The longest `jwks_uri` a discovery document may name (it is named in the log).
const MAX_JWKS_URI: usize = 2048;

/// How long a request waits for another request's fetch of an issuer's keys.
const KEY_WAIT: Duration = Duration::from_secs(10);

/// Why a bearer token was refused. Messages name the reason and never include the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwtError {
    #[error("no token issuers are configured in this broker ([callers.issuers])")]
    NoIssuers,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("issuer `{0}` is not trusted by this broker")]
    UntrustedIssuer(String),
    #[error("algorithm `{0}` is not allowed for this issuer")]
    AlgorithmNotAllowed(String),
    #[error("signed with an unknown key (kid `{0}`)")]
    UnknownKey(String),
    /// Without a `kid`, only an issuer's single key is unambiguous.
    #[error(
        "the token names no key (no `kid` in its header), and issuer `{issuer}` publishes {keys} keys: it must name the one that signed it"
    )]
    NoKeyId { issuer: String, keys: usize },
    #[error("the signature does not verify")]
    BadSignature,
    /// `exp` passed, beyond the leeway; told with the times, so that a clock set wrong on
    /// either side shows.
    #[error("expired at {0}")]
    Expired(ClaimedTime),
    #[error("not valid yet (nbf in the future): not before {0}")]
    NotYetValid(ClaimedTime),
    /// Says what the token must name: a caller's token for the wrong audience (another
    /// service's, or a GUID where an App ID URI is expected) is the usual setup mistake.
    #[error(
        "wrong audience: the token's `aud` does not name `{expected}`, this broker's audience for its issuer; get a token for that audience"
    )]
    WrongAudience { expected: String },
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// A user's token names the app the user signed in with; it must not act as that app.
    #[error(
        "a user's delegated token (it carries `{0}`) cannot stand for the app it names in `{1}`: present an app-only token (client credentials)"
    )]
    Delegated(&'static str, String),
    /// Too many tokens from this client address failed: new tokens from it wait.
    #[error(
        "too many failed authentications from this address; retry after {}s",
        (.retry_after.as_secs() + u64::from(.retry_after.subsec_nanos() > 0)).max(1)
    )]
    TooManyFailures { retry_after: Duration },
    /// The issuer's keys cannot be fetched: the caller is not at fault. Why is logged, not
    /// told: the caller is not authenticated, and the cause names the issuer's URLs and the
    /// broker's network.
    #[error("the signing keys of issuer `{issuer}` cannot be had now ({reason}); retry shortly")]
    KeysUnavailable {
        issuer: String,
        reason: &'static str,
        /// Until the broker asks the issuer again: a retry before then is refused the same.
        retry_after: Duration,
    },
}

/// A token's `exp` or `nbf` that failed the check, with the leeway and the broker's clock.
#[derive(Debug, Clone)]
pub struct ClaimedTime {
    at: Option<SystemTime>,
    leeway: Duration,
    now: SystemTime,
}

impl ClaimedTime {
    /// The NumericDate `claim` of token `t` (its signature verified), judged now.
    fn of(t: &str, claim: &str, leeway: Duration) -> ClaimedTime {
        let at = payload(t)
            .and_then(|claims| claims.get(claim).and_then(numeric_date))
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s.min(u64::from(u32::MAX))));
        ClaimedTime {
            at,
            leeway,
            now: SystemTime::now(),
        }
    }
}

impl fmt::Display for ClaimedTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = self.at {
            write!(f, "{} ", crate::audit::rfc3339(at))?;
        }
        write!(
            f,
            "({} s of clock skew allowed; the broker's clock reads {})",
            self.leeway.as_secs(),
            crate::audit::rfc3339(self.now)
        )
    }
}

/// Verifies bearer tokens for a set of configured issuers. Cheap to share.
pub struct JwtVerifier {
    issuers: HashMap<String, Arc<Issuer>>,
    http: reqwest::Client,
    /// Tokens verified before, by the SHA-256 of the token (`None`: configured off).
    verified: Option<moka::sync::Cache<[u8; 32], Arc<Verified>>>,
    /// Tokens whose signature was checked (not answered from `verified`).
    signature_checks: AtomicU64,
    /// Failed authentications per client address: a flood of bad tokens from one address
    /// cannot keep the signature checks busy, nor crowd out its other callers' tokens that
    /// verified before (they are answered from `verified` first).
    failures: Option<Buckets<IpAddr>>,
}

/// A token that verified: whom it names, until when, and against which keys.
pub(crate) struct Verified {
    pub(crate) caller: Caller,
    /// The token's `exp`: after it, the token goes through the full check (and its leeway).
    exp: SystemTime,
    issuer: Arc<Issuer>,
    /// The key set the signature verified against. Held, so that a newer set can never be
    /// mistaken for it by address.
    keys: Arc<Keys>,
}

impl Verified {
    /// Whether the verification still stands at `now`: before the token's `exp`, and the
    /// issuer's keys in use (and fresh) are the set it was verified against.
    fn stands(&self, now: SystemTime) -> bool {
        now < self.exp
            && self.issuer.fresh(&self.keys)
            && self
                .issuer
                .keys
                .load()
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &self.keys))
    }
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Issuer {
    cfg: IssuerConfig,
    keys: ArcSwapOption<Keys>,
    /// Held while fetching, so one request fetches and the others wait for its keys.
    refresh: Arc<tokio::sync::Mutex<RefreshGate>>,
    fetches: AtomicU64,
    /// Whether a task fetches the keys again in the background (`refresh_behind`).
    refreshing_behind: AtomicBool,
}

/// The retry hint of a request that found the issuer's keys being fetched and could not
/// wait for them.
const KEYS_BEING_FETCHED_RETRY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct RefreshGate {
    /// Last refresh caused by an unknown `kid`.
    unknown_kid: Option<Instant>,
    /// Last failed fetch.
    failed: Option<Instant>,
}

/// A token through the checks before its signature.
struct Prepared<'a> {
    issuer: &'a Arc<Issuer>,
    alg: Algorithm,
    alg_name: String,
    key: DecodingKey,
    keys: Arc<Keys>,
}

struct Keys {
    keys: Vec<Jwk>,
    fetched: Instant,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

fn b64_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, JwtError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(format!("the {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::Malformed(format!("the {what} is not a JSON object")))
}

/// The claims of token `t`, for telling what is wrong with one after its check.
fn payload(t: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    b64_json(t.split('.').nth(1)?, "payload").ok()
}

/// Why the check found no claim `c` in token `t`: absent, or present in a form it cannot read
/// (an `exp` as text is not missing, and saying so sends its issuer's operator looking for
/// the wrong fault).
fn unreadable_claim(t: &str, c: &str) -> JwtError {
    if !payload(t).is_some_and(|claims| claims.contains_key(c)) {
        return JwtError::MissingClaim(c.to_owned());
    }
    let form = match c {
        "exp" | "nbf" => "a NumericDate (seconds since 1970-01-01T00:00:00Z)",
        "aud" => "a string or an array of strings",
        _ => "a string",
    };
    JwtError::Malformed(format!("claim `{c}` is not {form}"))
}

/// A NumericDate claim in whole seconds, as `jsonwebtoken` validates it: an integer, or a
/// non-negative number with a fraction, rounded.
fn numeric_date(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            // Saturates: the caller bounds it.
            .map(|f| f.round() as u64)
    })
}

/// What a token claims, as its refusal tells it: at most 128 characters, control characters
/// escaped. The token is not verified yet; its claim is in the log, where a line break would
/// start a log line of the sender's making.
fn short(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(128) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl JwtVerifier {
    /// `failures`: the limit of failed authentications per client address, if any.
    /// `remember`: how many verified tokens are remembered, and for how long at most.
    pub fn new(
        issuers: Vec<IssuerConfig>,
        http: reqwest::Client,
        failures: Option<Buckets<IpAddr>>,
        remember: RememberConfig,
    ) -> Self {
        let issuers = issuers
            .into_iter()
            .map(|cfg| {
                (
                    cfg.issuer.clone(),
                    Arc::new(Issuer {
                        cfg,
                        keys: ArcSwapOption::empty(),
                        refresh: Arc::new(tokio::sync::Mutex::new(RefreshGate::default())),
                        fetches: AtomicU64::new(0),
                        refreshing_behind: AtomicBool::new(false),
                    }),
                )
            })
            .collect();
        JwtVerifier {
            issuers,
            http,
            verified: (!remember.is_off()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(remember.tokens)
                    .time_to_live(remember.max_age)
                    .build()
            }),
            signature_checks: AtomicU64::new(0),
            failures,
        }
    }

    /// How many tokens have had their signature checked (a remembered verification is not
    /// counted).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// How many times the keys of the issuer named `name` have been fetched.
    pub fn key_fetches(&self, name: &str) -> u64 {
        self.issuers
            .values()
            .find(|i| i.cfg.name == name)
            .map_or(0, |i| i.fetches.load(Ordering::Relaxed))
    }

    /// Verifies `token`, sent from `peer` (when known).
    pub async fn verify(
        &self,
        token: &Sensitive,
        peer: Option<IpAddr>,
    ) -> Result<Caller, JwtError> {
        let t = token.expose();
        if t.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        // The memory (when on) and this token's key in it.
        let memory = self
            .verified
            .as_ref()
            .map(|m| (m, <[u8; 32]>::from(Sha256::digest(t.as_bytes()))));
        // A token that verified before, not expired, but against keys no longer in use (the
        // issuer's keys fetched again, at anyone's request): checked again in full, but not
        // charged to its address, which may be out of failures because of another client
        // behind it. It is no forgery, and one check at most: refused, it is forgotten.
        let mut verified_before = None;
        if let Some((m, digest)) = &memory
            && let Some(v) = m.get(digest)
        {
            let now = SystemTime::now();
            if v.stands(now) {
                return Ok(v.caller.clone());
            }
            if now < v.exp {
                verified_before = Some((m, digest));
            }
        }
        if let Some((m, digest)) = verified_before {
            return match self.prepare(t, &|| Ok(())).await {
                Ok(prepared) => self.check(t, prepared),
                Err(e) => Err(e),
            }
            .map(|verified| {
                let caller = verified.caller.clone();
                m.insert(*digest, Arc::new(verified));
                caller
            })
            .inspect_err(|_| m.invalidate(digest));
        }
        let failures = self
            .failures
            .as_ref()
            .zip(peer.map(crate::limits::address_key));
        let too_many = |retry_after| JwtError::TooManyFailures { retry_after };
        if let Some((f, address)) = &failures {
            f.peek(address).map_err(too_many)?;
        }
        // Charged before the token waits for the issuer's keys to be fetched again for its
        // `kid`: forged kids from one address cannot all wait (holding in-flight slots)
        // beyond that address's burst.
        let charged = AtomicBool::new(false);
        let charge = || {
            if let Some((f, address)) = &failures {
                f.take(address).map_err(too_many)?;
                charged.store(true, Ordering::Relaxed);
            }
            Ok(())
        };
        // A request dropped during that wait (its client gave up, its deadline passed) was
        // found to be nothing: its charge is handed back, or a client whose requests time
        // out while a slow issuer's rotated keys are fetched would lose its valid tokens too.
        let unsettled = Unsettled {
            failures,
            charged: &charged,
        };
        let prepared = self.prepare(t, &charge).await;
        unsettled.settle();
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let unreachable = matches!(e, JwtError::KeysUnavailable { .. });
                if let Some((f, address)) = &failures {
                    match (charged.load(Ordering::Relaxed), unreachable) {
                        // An issuer that cannot be reached is not the caller's failure.
                        (true, true) => f.give_back(address),
                        // A token refused before its signature is checked costs little, and
                        // is counted afterwards.
                        (false, false) => {
                            let _ = f.take(address);
                        }
                        _ => {}
                    }
                }
                return Err(e);
            }
        };
        // The signature check is what a flood of bad tokens must not keep busy: its failure
        // is counted before it, in one step with the check that the address has one left, so
        // bad tokens arriving together cannot all pass the peek above and exceed the burst.
        // A token that verifies hands it back: valid callers are not charged. Nothing waits
        // between the two, so concurrent valid tokens hardly ever see each other's charge.
        if !charged.load(Ordering::Relaxed) {
            charge()?;
        }
        let verified = self.check(t, prepared)?;
        if let Some((f, address)) = &failures {
            f.give_back(address);
        }
        let caller = verified.caller.clone();
        if let Some((m, digest)) = memory {
            m.insert(digest, Arc::new(verified));
        }
        Ok(caller)
    }

    /// The full check of a token (the benchmarks time it alone).
    #[cfg(feature = "emulator")]
    pub(crate) async fn verify_signed(&self, t: &str) -> Result<Verified, JwtError> {
        let prepared = self.prepare(t, &|| Ok(())).await?;
        self.check(t, prepared)
    }

    /// The checks before the signature: shape, issuer, algorithm, and the key (which may be
    /// fetched).
    /// `charge` is called before waiting for a fetch of the issuer's keys for an unknown
    /// `kid`, and may refuse the wait.
    async fn prepare<'a>(
        &'a self,
        t: &str,
        charge: &(dyn Fn() -> Result<(), JwtError> + Sync),
    ) -> Result<Prepared<'a>, JwtError> {
        let parts: Vec<&str> = t.split('.').collect();
        let [header, payload, _sig] = parts.as_slice() else {
            return Err(JwtError::Malformed(
                "not a signed JWT (three dot-separated parts)".into(),
            ));
        };
        let header: RawHeader = b64_json(header, "header")?;
        let unverified: serde_json::Map<String, serde_json::Value> = b64_json(payload, "payload")?;
        let iss = match unverified.get("iss") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| JwtError::Malformed("claim `iss` is not a string".into()))?,
            None => return Err(JwtError::MissingClaim("iss".into())),
        };
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| JwtError::UntrustedIssuer(short(iss)))?;
        let alg_name = header.alg.unwrap_or_default();
        let alg = alg_name
            .parse::<Algorithm>()
            .ok()
            .filter(|a| issuer.cfg.algorithms.contains(a))
            .ok_or_else(|| JwtError::AlgorithmNotAllowed(short(&alg_name)))?;
        let (jwk, keys) = self.key(issuer, header.kid.as_deref(), charge).await?;
        if let Some(ka) = jwk.common.key_algorithm
            && ka.to_string() != alg_name
        {
            return Err(JwtError::AlgorithmNotAllowed(short(&alg_name)));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| JwtError::BadSignature)?;
        Ok(Prepared {
            issuer,
            alg,
            alg_name,
            key,
            keys,
        })
    }

    /// The signature and the claims of a prepared token.
    fn check(&self, t: &str, prepared: Prepared<'_>) -> Result<Verified, JwtError> {
        let Prepared {
            issuer,
            alg,
            alg_name,
            key,
            keys,
        } = prepared;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&issuer.cfg.issuer]);
        v.set_audience(&issuer.cfg.audiences);
        v.leeway = issuer.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let data = jsonwebtoken::decode::<Claims>(t, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => {
                JwtError::Expired(ClaimedTime::of(t, "exp", issuer.cfg.leeway))
            }
            ErrorKind::ImmatureSignature => {
                JwtError::NotYetValid(ClaimedTime::of(t, "nbf", issuer.cfg.leeway))
            }
            ErrorKind::InvalidAudience => JwtError::WrongAudience {
                expected: issuer.cfg.audiences.join("` or `"),
            },
            ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
            ErrorKind::InvalidSignature => JwtError::BadSignature,
            ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed(short(&alg_name)),
            ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                unreadable_claim(t, c)
            }
            _ => JwtError::Malformed("the token does not decode".into()),
        })?;
        let claim = &issuer.cfg.identity_claim;
        // `azp` and `appid` name the client app, also in a token a user got through that app
        // (a public client: any user of the tenant can sign in with it). Named by the app,
        // only the app's own tokens count: a delegated token carries `scp` (the user's
        // consented permissions), and Entra's optional `idtyp` says "user".
        if matches!(claim.as_str(), "azp" | "appid") {
            if data.claims.rest.contains_key("scp") {
                return Err(JwtError::Delegated("scp", claim.clone()));
            }
            if data.claims.rest.get("idtyp").and_then(|v| v.as_str()) == Some("user") {
                return Err(JwtError::Delegated("idtyp: user", claim.clone()));
            }
        }
        // `azp` and `appid` are lifted out of the other claims by serde.
        let value = match claim.as_str() {
            "azp" => data.claims.azp.clone(),
            "appid" => data.claims.appid.clone(),
            other => data
                .claims
                .rest
                .get(other)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        }
        .filter(|s| !s.is_empty() && s.len() <= 512)
        .ok_or_else(|| JwtError::MissingClaim(claim.clone()))?;
        // The identity goes into log lines (a line break would start one of the token's
        // making) and policy grants (which could not name it).
        if value.chars().any(char::is_control) {
            return Err(JwtError::Malformed(format!(
                "claim `{claim}` holds control characters: it cannot name a caller"
            )));
        }
        // Validation required `exp` and read it as a NumericDate (RFC 7519: a fraction is
        // allowed, rounded to the second); read here the same way, or such a token's watch
        // would end at once.
        let exp = data
            .claims
            .rest
            .get("exp")
            .and_then(numeric_date)
            .map_or(SystemTime::UNIX_EPOCH, |s| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(s.min(u64::from(u32::MAX)))
            });
        Ok(Verified {
            caller: Caller {
                id: format!("jwt:{}:{value}", issuer.cfg.name),
                proof: Proof::Jwt,
                app_id: data.claims.azp.or(data.claims.appid),
                // Validation compares whole seconds: the token is accepted through the
                // second that ends one second after `exp` plus the leeway.
                valid_until: Some(exp + issuer.cfg.leeway + Duration::from_secs(1)),
            },
            exp,
            issuer: issuer.clone(),
            keys,
        })
    }

    /// The published key for `kid`. Keys are fetched when missing, and again when older than
    /// `jwks_max_age` (after a failure, not again within `jwks_min_refresh`): in the
    /// background if they hold the token's key, which is used meanwhile, so that no request
    /// waits on an issuer that is slow or down (known keys stay usable through its outage
    /// anyway). They are re-fetched for an unknown `kid` at most once per
    /// `jwks_min_refresh`: a rotation is picked up at once, while forged kids cannot make
    /// the broker hammer the issuer.
    /// Also returns the key set it is from. A request waits at most `KEY_WAIT` for another's
    /// fetch, and calls `charge` first when its `kid` is what would be fetched for.
    async fn key(
        &self,
        issuer: &Arc<Issuer>,
        kid: Option<&str>,
        charge: &(dyn Fn() -> Result<(), JwtError> + Sync),
    ) -> Result<(Jwk, Arc<Keys>), JwtError> {
        let find = |keys: &Arc<Keys>| -> Option<(Jwk, Arc<Keys>)> {
            let jwk = match kid {
                Some(k) => keys
                    .keys
                    .iter()
                    .find(|j| j.common.key_id.as_deref() == Some(k)),
                // Without a kid, only an issuer with a single key is unambiguous.
                None if keys.keys.len() == 1 => keys.keys.first(),
                None => None,
            };
            jwk.map(|j| (j.clone(), keys.clone()))
        };
        let cfg = &issuer.cfg;
        // No key for the token in `keys`.
        let unknown = |keys: &Keys| match kid {
            Some(k) => JwtError::UnknownKey(short(k)),
            None => JwtError::NoKeyId {
                issuer: cfg.name.clone(),
                keys: keys.keys.len(),
            },
        };
        let before = issuer.keys.load_full();
        if let Some(keys) = &before {
            match find(keys) {
                Some(k) if issuer.fresh(keys) => return Ok(k),
                Some(k) => {
                    self.refresh_behind(issuer);
                    return Ok(k);
                }
                None if issuer.fresh(keys) => charge()?,
                None => {}
            }
        }
        // Bounded: each waiter holds an in-flight slot, and the fetch under way may take up
        // to the outbound timeout per request.
        let Ok(mut gate) =
            tokio::time::timeout(KEY_WAIT, issuer.refresh.clone().lock_owned()).await
        else {
            return match before.as_ref().and_then(find) {
                Some(k) => Ok(k),
                None => match &before {
                    Some(keys) => Err(unknown(keys)),
                    None => Err(JwtError::KeysUnavailable {
                        issuer: cfg.name.clone(),
                        reason: "they are being fetched",
                        retry_after: KEYS_BEING_FETCHED_RETRY,
                    }),
                },
            };
        };
        // Another request may have refreshed while this one waited.
        let current = issuer.keys.load_full();
        let may_fetch = match &current {
            Some(keys) if issuer.fresh(keys) => {
                if let Some(k) = find(keys) {
                    return Ok(k);
                }
                !issuer.recent(gate.unknown_kid)
            }
            // Missing or old keys: fetch, unless the last attempt failed a moment ago.
            _ => !issuer.recent(gate.failed),
        };
        if !may_fetch {
            return match &current {
                Some(keys) => find(keys).ok_or_else(|| unknown(keys)),
                None => Err(JwtError::KeysUnavailable {
                    issuer: cfg.name.clone(),
                    reason: "the last attempt to fetch them failed a moment ago",
                    retry_after: gate.failed.map_or(cfg.jwks_min_refresh, |at| {
                        cfg.jwks_min_refresh.saturating_sub(at.elapsed())
                    }),
                }),
            };
        }
        if current.as_deref().is_some_and(|k| issuer.fresh(k)) {
            gate.unknown_kid = Some(Instant::now());
        }
        // On a task of its own, holding the gate: a request dropped while its fetch runs (its
        // client gave up on a slow issuer) does not cut the fetch short, and the keys it gets
        // (an issuer's new key) are there for the next token, which the throttle above would
        // otherwise refuse as signed with an unknown key until jwks_min_refresh has passed.
        let fetch = {
            let (issuer, http) = (issuer.clone(), self.http.clone());
            tokio::spawn(async move { issuer.fetch_keys(&http, &mut gate).await })
        };
        // A fetch that panicked fetched nothing.
        match fetch.await.ok().flatten() {
            Some(keys) => find(&keys).ok_or_else(|| unknown(&keys)),
            None => {
                // Keys already known stay usable through an issuer outage.
                match &current {
                    Some(keys) => find(keys).ok_or_else(|| unknown(keys)),
                    None => Err(JwtError::KeysUnavailable {
                        issuer: cfg.name.clone(),
                        reason: "fetching them failed; the broker's log has the cause",
                        // Not asked again before then.
                        retry_after: cfg.jwks_min_refresh,
                    }),
                }
            }
        }
    }

    /// Fetches `issuer`'s keys again in the background, unless a task does already, or the
    /// last attempt failed within `jwks_min_refresh`.
    fn refresh_behind(&self, issuer: &Arc<Issuer>) {
        if issuer.refreshing_behind.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Lets the next request start a background fetch, however this one ends.
        struct Done(Arc<Issuer>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.refreshing_behind.store(false, Ordering::Release);
            }
        }
        let done = Done(issuer.clone());
        let http = self.http.clone();
        tokio::spawn(async move {
            let issuer = &done.0;
            let mut gate = issuer.refresh.lock().await;
            // Fetched by a request meanwhile, or failing.
            let stale = !issuer
                .keys
                .load()
                .as_deref()
                .is_some_and(|k| issuer.fresh(k));
            if stale && !issuer.recent(gate.failed) {
                issuer.fetch_keys(&http, &mut gate).await;
            }
        });
    }
}

impl Issuer {
    /// Whether `keys` are younger than `jwks_max_age`: used without being fetched again.
    fn fresh(&self, keys: &Keys) -> bool {
        keys.fetched.elapsed() < self.cfg.jwks_max_age
    }

    /// Whether `at` (a fetch's time) is within `jwks_min_refresh`: not fetched again so soon.
    fn recent(&self, at: Option<Instant>) -> bool {
        at.is_some_and(|t| t.elapsed() < self.cfg.jwks_min_refresh)
    }

    /// Fetches the keys, holding `gate`, and installs them: `None` (logged, and remembered in
    /// `gate`) if that failed.
    async fn fetch_keys(
        &self,
        http: &reqwest::Client,
        gate: &mut RefreshGate,
    ) -> Option<Arc<Keys>> {
        let cfg = &self.cfg;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match fetch(http, cfg).await {
            Ok(keys) => {
                info!(issuer = %cfg.name, keys = keys.len(), "token issuer keys fetched");
                gate.failed = None;
                let keys = Arc::new(Keys {
                    keys,
                    fetched: Instant::now(),
                });
                self.keys.store(Some(keys.clone()));
                Some(keys)
            }
            Err(message) => {
                warn!(issuer = %cfg.name, error = %message, "cannot fetch token issuer keys");
                gate.failed = Some(Instant::now());
                None
            }
        }
    }
}

/// The failure charged to an address for a token waiting for its issuer's keys, handed
/// back if the request is dropped before the wait ends (forgotten once it ends).
struct Unsettled<'a> {
    failures: Option<(&'a Buckets<IpAddr>, IpAddr)>,
    charged: &'a AtomicBool,
}

impl Unsettled<'_> {
    /// The wait ended: what the charge becomes is the request's to decide.
    fn settle(mut self) {
        self.failures = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if let Some((f, address)) = &self.failures
            && self.charged.load(Ordering::Relaxed)
        {
            f.give_back(address);
        }
    }
}

/// An issuer's keys: its discovery document, then the JWKS it names.
async fn fetch(http: &reqwest::Client, cfg: &IssuerConfig) -> Result<Vec<Jwk>, String> {
    let discovery: Discovery = get_json(http, &cfg.discovery_url, "the discovery document").await?;
    if discovery.issuer != cfg.issuer {
        return Err(format!(
            "the discovery document names issuer `{}`, not `{}`",
            short(&discovery.issuer),
            cfg.issuer
        ));
    }
    let jwks_uri = jwks_uri(&discovery.jwks_uri)?;
    let raw: RawJwks = get_json(http, &jwks_uri, "the JWKS").await?;
    // Keys of types this broker does not verify with are skipped, not fatal.
    Ok(raw
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
        .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .collect())
}

/// The JSON document `what` at `url`, of at most `MAX_ISSUER_DOCUMENT` bytes.
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &Url,
    what: &str,
) -> Result<T, String> {
    let failed = |e: &dyn fmt::Display| format!("GET {url} ({what}): {e}");
    let resp = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| failed(&crate::outbound::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(failed(&format_args!("HTTP {}", resp.status())));
    }
    let body = crate::outbound::body_within(resp, MAX_ISSUER_DOCUMENT)
        .await
        .map_err(|e| failed(&e))?;
    serde_json::from_slice(&body).map_err(|e| failed(&format_args!("not the expected JSON ({e})")))
}

/// The `jwks_uri` of a discovery document as a URL the broker fetches: https (http only on
/// loopback), without credentials (they would be sent, and logged with the URL), and short
/// enough to be named in the log.
fn jwks_uri(s: &str) -> Result<Url, String> {
    if s.len() > MAX_JWKS_URI {
        return Err(format!(
            "the discovery document's jwks_uri is longer than {MAX_JWKS_URI} bytes"
        ));
    }
    let u = Url::parse(s).map_err(|e| format!("the discovery document's jwks_uri: {e}"))?;
    if !crate::config::secure_or_loopback(&u) {
        return Err(
            "the discovery document's jwks_uri must use https (http only on loopback)".into(),
        );
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("the discovery document's jwks_uri carries a user name or password".into());
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Arc<Issuer> {
        Arc::new(Issuer {
            cfg: IssuerConfig {
                name: "test".into(),
                issuer: "https://issuer.example".into(),
                discovery_url: Url::parse(
                    "https://issuer.example/.well-known/openid-configuration",
                )
                .unwrap(),
                audiences: vec!["api://tokenbroker".into()],
                algorithms: vec![Algorithm::ES256],
                identity_claim: "sub".into(),
                leeway: Duration::from_secs(60),
                jwks_min_refresh: Duration::from_secs(30),
                jwks_max_age: Duration::from_secs(3600),
            },
            keys: ArcSwapOption::empty(),
            refresh: Arc::new(tokio::sync::Mutex::new(RefreshGate::default())),
            fetches: AtomicU64::new(0),
            refreshing_behind: AtomicBool::new(false),
        })
    }

    fn keys() -> Arc<Keys> {
        Arc::new(Keys {
            keys: Vec::new(),
            fetched: Instant::now(),
        })
    }

    #[test]
    fn a_jwks_uri_is_fetched_only_over_https_or_loopback_http_without_credentials_and_bounded() {
        for good in [
            "https://issuer.example/keys",
            "http://127.0.0.1:8080/keys",
            "http://localhost/keys",
        ] {
            assert_eq!(jwks_uri(good).unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("http://issuer.example/keys", "https"),
            ("not a url", "jwks_uri"),
            (
                "https://user:secret@issuer.example/keys",
                "user name or password",
            ),
            ("https://user@issuer.example/keys", "user name or password"),
        ] {
            let e = jwks_uri(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let long = format!("https://issuer.example/{}", "k".repeat(MAX_JWKS_URI));
        let e = jwks_uri(&long).unwrap_err();
        assert!(e.contains("longer than 2048 bytes"), "{e}");
        assert!(!e.contains("kkkk"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_verification_ends_at_exp_at_new_keys_and_when_the_keys_age() {
        let issuer = issuer();
        let verified_with = keys();
        issuer.keys.store(Some(verified_with.clone()));
        let now = SystemTime::now();
        let v = Verified {
            caller: Caller {
                id: "jwt:test:a".into(),
                proof: Proof::Jwt,
                app_id: None,
                valid_until: None,
            },
            exp: now + Duration::from_secs(300),
            issuer: issuer.clone(),
            keys: verified_with.clone(),
        };
        assert!(v.stands(now));
        assert!(v.stands(now + Duration::from_secs(299)));
        assert!(!v.stands(now + Duration::from_secs(300)), "expired");
        // Keys fetched again, even with the same content: verify again.
        issuer.keys.store(Some(keys()));
        assert!(!v.stands(now));
        issuer.keys.store(Some(verified_with));
        assert!(v.stands(now));
        // Keys past their age are fetched again before use: so is the verification redone.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!v.stands(now));
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn what_a_refused_token_claims_is_told_on_one_line() {
        let (key, iss, release, _asked, verifier) = held_issuer(100, "sub").await;
        release.add_permits(100);
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let forged_line = "\n2026-11-24T21:00:00Z  INFO tokenbroker: all is well\r";
        let good = signed(&key, &iss, "svc");
        let body = good.split('.').nth(1).unwrap().to_owned();
        let peer: IpAddr = "192.0.2.10".parse().unwrap();
        let refused = [
            (
                format!(
                    "{}.{}.c2ln",
                    b64(serde_json::json!({"alg": "RS256", "kid": "k"})),
                    b64(serde_json::json!({"iss": format!("https://evil.example{forged_line}")}))
                ),
                "not trusted",
            ),
            (
                format!(
                    "{}.{body}.c2ln",
                    b64(serde_json::json!({"alg": format!("RS256{forged_line}")}))
                ),
                "not allowed",
            ),
            (
                format!(
                    "{}.{body}.c2ln",
                    b64(serde_json::json!({"alg": "RS256", "kid": format!("k{forged_line}")}))
                ),
                "unknown key",
            ),
        ];
        for (token, says) in refused {
            let e = verifier
                .verify(&Sensitive::new(token), Some(peer))
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
            // Logged as it is: a claim's line break would start a forged log line.
            assert!(!e.contains(['\n', '\r']), "{e}");
            assert!(e.contains("\\n2026"), "{e}");
        }
    }

    /// `held_issuer`'s: the issuer's key, its URL, the permits that release its answers, a
    /// word for each request it gets, and the verifier.
    #[cfg(feature = "emulator")]
    type HeldIssuer = (
        crate::emulator::keys::IssuerKey,
        String,
        Arc<tokio::sync::Semaphore>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        Arc<JwtVerifier>,
    );

    /// An issuer on loopback whose discovery document is answered only once `release` has
    /// a permit, and says on `asked` that it was asked; a verifier trusting it, with a limit
    /// of `burst` failed tokens per address.
    #[cfg(feature = "emulator")]
    async fn held_issuer(burst: u32, identity_claim: &str) -> HeldIssuer {
        held_issuer_aging(burst, identity_claim, Duration::from_secs(3600)).await
    }

    /// `held_issuer`, its keys counted old after `jwks_max_age`.
    #[cfg(feature = "emulator")]
    async fn held_issuer_aging(
        burst: u32,
        identity_claim: &str,
        jwks_max_age: Duration,
    ) -> HeldIssuer {
        use axum::Json;
        use axum::routing::get;
        let key = crate::emulator::keys::IssuerKey::generate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let iss = format!("http://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({"issuer": iss, "jwks_uri": format!("{iss}/keys")});
        let jwks = key.jwks();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (tell, asked) = tokio::sync::mpsc::unbounded_channel();
        let held = release.clone();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let (held, tell, discovery) = (held.clone(), tell.clone(), discovery.clone());
                    async move {
                        let _ = tell.send(());
                        held.acquire().await.unwrap().forget();
                        Json(discovery)
                    }
                }),
            )
            .route("/keys", get(move || std::future::ready(Json(jwks.clone()))));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let cfg = IssuerConfig {
            name: "held".into(),
            issuer: iss.clone(),
            discovery_url: Url::parse(&format!("{iss}/.well-known/openid-configuration")).unwrap(),
            audiences: vec!["api://tokenbroker".into()],
            algorithms: vec![Algorithm::RS256],
            identity_claim: identity_claim.into(),
            leeway: Duration::from_secs(60),
            jwks_min_refresh: Duration::from_secs(30),
            jwks_max_age,
        };
        let verifier = JwtVerifier::new(
            vec![cfg],
            reqwest::Client::new(),
            Some(Buckets::new(0.001, burst, 100, Duration::from_secs(600))),
            RememberConfig::default(),
        );
        (key, iss, release, asked, Arc::new(verifier))
    }

    #[cfg(feature = "emulator")]
    fn signed(key: &crate::emulator::keys::IssuerKey, iss: &str, sub: &str) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        key.sign(&serde_json::json!({
            "iss": iss, "sub": sub, "aud": "api://tokenbroker", "iat": now, "exp": now + 3600,
        }))
        .unwrap()
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn named_by_its_app_only_an_apps_own_token_is_accepted_not_a_users() {
        let (key, iss, release, _asked, verifier) = held_issuer(100, "azp").await;
        release.add_permits(100);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({
                "iss": iss, "sub": "s", "aud": "api://tokenbroker", "iat": now,
                "exp": now + 3600, "azp": "app-1",
            });
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Sensitive::new(key.sign(&claims).unwrap())
        };
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        for app_only in [
            serde_json::json!({}),
            serde_json::json!({"idtyp": "app", "roles": ["Broker.Read"]}),
        ] {
            let caller = verifier.verify(&token(app_only), Some(peer)).await.unwrap();
            assert_eq!(caller.id, "jwt:held:app-1");
        }
        // A user signed in through app-1 (a public client) must not become app-1.
        for (delegated, names) in [
            (serde_json::json!({"scp": "user_impersonation"}), "`scp`"),
            (serde_json::json!({"idtyp": "user"}), "`idtyp: user`"),
        ] {
            let e = verifier
                .verify(&token(delegated), Some(peer))
                .await
                .unwrap_err();
            assert!(matches!(e, JwtError::Delegated(..)), "{e}");
            assert!(e.to_string().contains(names), "{e}");
        }
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn tokens_with_forged_kids_from_one_address_wait_for_a_key_fetch_only_within_its_burst() {
        let burst = 3;
        let (key, iss, release, mut asked, verifier) = held_issuer(burst, "sub").await;
        // The keys are fetched once, for a valid token.
        release.add_permits(1);
        let peer: IpAddr = "192.0.2.8".parse().unwrap();
        let valid = Sensitive::new(signed(&key, &iss, "svc"));
        verifier.verify(&valid, Some(peer)).await.unwrap();
        asked.recv().await.unwrap();
        // Ten tokens naming kids the issuer never published: the first has the keys fetched
        // again (held by the issuer), and only the address's burst may wait for that fetch.
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let body = valid.expose().split('.').nth(1).unwrap().to_owned();
        let (tell, mut told) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..10 {
            let header = b64(serde_json::json!({"alg": "RS256", "kid": format!("forged-{i}")}));
            let forged = Sensitive::new(format!("{header}.{body}.c2ln"));
            let (v, tell) = (verifier.clone(), tell.clone());
            tokio::spawn(async move {
                let _ = tell.send(v.verify(&forged, Some(peer)).await);
            });
        }
        tokio::time::timeout(Duration::from_secs(20), asked.recv())
            .await
            .expect("the first forged kid has the keys fetched again")
            .unwrap();
        // While the fetch is held, all but the burst are refused without waiting for it.
        for _ in 0..10 - burst {
            let r = tokio::time::timeout(Duration::from_secs(20), told.recv())
                .await
                .expect("refused without waiting for the fetch")
                .unwrap();
            assert!(matches!(r, Err(JwtError::TooManyFailures { .. })), "{r:?}");
        }
        assert!(told.try_recv().is_err(), "the burst waits for the fetch");
        release.add_permits(1);
        for _ in 0..burst {
            let r = told.recv().await.unwrap();
            assert!(matches!(r, Err(JwtError::UnknownKey(_))), "{r:?}");
        }
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn keys_past_their_max_age_holding_the_tokens_key_serve_while_fetched_again() {
        // Every fetch's keys are old at once.
        let (key, iss, release, mut asked, verifier) =
            held_issuer_aging(3, "sub", Duration::ZERO).await;
        release.add_permits(1);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let token = |sub: &str| Sensitive::new(signed(&key, &iss, sub));
        verifier.verify(&token("first"), Some(peer)).await.unwrap();
        asked.recv().await.unwrap();
        // The issuer now holds every request (slow, or down): requests whose key the old
        // keys hold are verified with them, without waiting for it; one fetch is under way.
        for sub in ["second", "third", "fourth"] {
            let verified = tokio::time::timeout(
                Duration::from_secs(20),
                verifier.verify(&token(sub), Some(peer)),
            )
            .await
            .expect("verified without waiting for the issuer")
            .unwrap();
            assert_eq!(verified.id, format!("jwt:held:{sub}"));
        }
        asked.recv().await.unwrap();
        assert!(asked.try_recv().is_err(), "one fetch at a time");
        assert_eq!(verifier.issuers[&iss].fetches.load(Ordering::Relaxed), 2);
        // Once it ends, a request past the keys' age has them fetched again.
        release.add_permits(2);
        while verifier.issuers[&iss]
            .refreshing_behind
            .load(Ordering::Acquire)
        {
            tokio::task::yield_now().await;
        }
        verifier.verify(&token("fifth"), Some(peer)).await.unwrap();
        asked.recv().await.unwrap();
    }

    /// `token` with the signature of `other`: well formed, from a trusted issuer and key,
    /// and its signature does not verify.
    #[cfg(feature = "emulator")]
    fn forged(token: &str, other: &str) -> Sensitive {
        let (signed_part, _) = token.rsplit_once('.').unwrap();
        let (_, signature) = other.rsplit_once('.').unwrap();
        Sensitive::new(format!("{signed_part}.{signature}"))
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn bad_tokens_sent_together_from_one_address_get_at_most_the_burst_of_full_checks() {
        let burst = 3;
        let (key, iss, release, mut asked, verifier) = held_issuer(burst, "sub").await;
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let other = signed(&key, &iss, "other");
        // Ten bad tokens at once: each passes the quick look at the address's budget, then
        // waits for the issuer's keys (fetched by the first, held back by the issuer).
        let checks: Vec<_> = (0..10)
            .map(|i| {
                let v = verifier.clone();
                let bad = forged(&signed(&key, &iss, &format!("bad-{i}")), &other);
                tokio::spawn(async move { v.verify(&bad, Some(peer)).await })
            })
            .collect();
        asked.recv().await.unwrap();
        release.add_permits(1);
        let mut refused = 0;
        let mut failed = 0;
        for c in checks {
            match c.await.unwrap() {
                Err(JwtError::TooManyFailures { .. }) => refused += 1,
                Err(JwtError::BadSignature) => failed += 1,
                other => panic!("{:?}", other.map(|c| c.id)),
            }
        }
        assert_eq!(verifier.signature_checks(), u64::from(burst));
        assert_eq!((failed, refused), (3, 7));
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn a_token_that_verified_before_is_verified_again_past_its_address_s_failures() {
        let burst = 3;
        let (key, iss, release, _asked, verifier) = held_issuer(burst, "sub").await;
        release.add_permits(100);
        let shared: IpAddr = "192.0.2.20".parse().unwrap();
        let valid = Sensitive::new(signed(&key, &iss, "svc"));
        verifier.verify(&valid, Some(shared)).await.unwrap();
        // Another client behind the same address spends its budget on bad tokens.
        let other = signed(&key, &iss, "other");
        for i in 0..burst {
            let bad = forged(&signed(&key, &iss, &format!("bad-{i}")), &other);
            assert!(verifier.verify(&bad, Some(shared)).await.is_err());
        }
        assert!(matches!(
            verifier
                .verify(&forged(&other, valid.expose()), Some(shared))
                .await,
            Err(JwtError::TooManyFailures { .. })
        ));
        // Anyone, from anywhere, has the issuer's keys fetched again (a kid it lacks).
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let body = valid.expose().split('.').nth(1).unwrap().to_owned();
        let header = b64(serde_json::json!({"alg": "RS256", "kid": "forged"}));
        let elsewhere: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(matches!(
            verifier
                .verify(
                    &Sensitive::new(format!("{header}.{body}.c2ln")),
                    Some(elsewhere)
                )
                .await,
            Err(JwtError::UnknownKey(_))
        ));
        assert_eq!(verifier.key_fetches("held"), 2);
        // The token that verified before is checked again in full, and still works.
        let checks = verifier.signature_checks();
        assert_eq!(
            verifier.verify(&valid, Some(shared)).await.unwrap().id,
            "jwt:held:svc"
        );
        assert_eq!(verifier.signature_checks(), checks + 1);
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn an_identity_with_control_characters_names_no_caller() {
        let (key, iss, release, _asked, verifier) = held_issuer(100, "sub").await;
        release.add_permits(100);
        let peer: IpAddr = "192.0.2.30".parse().unwrap();
        // The identity is in log lines, where a line break would start one of the issuer's
        // (or its user's) making, and no policy grant could name it.
        for sub in [
            "svc\n2026-11-24T21:00:00Z  INFO tokenbroker: forged",
            "svc\u{1b}[2J",
        ] {
            let token = Sensitive::new(signed(&key, &iss, sub));
            let e = verifier.verify(&token, Some(peer)).await.unwrap_err();
            assert!(
                e.to_string()
                    .contains("claim `sub` holds control characters"),
                "{e}"
            );
        }
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn requests_given_up_while_waiting_for_the_issuers_keys_leave_their_address_s_budget_whole()
     {
        let burst = 3;
        let (key, iss, release, mut asked, verifier) = held_issuer(burst, "sub").await;
        // The issuer's keys, fetched and fresh.
        release.add_permits(1);
        let elsewhere: IpAddr = "198.51.100.2".parse().unwrap();
        verifier
            .verify(
                &Sensitive::new(signed(&key, &iss, "first")),
                Some(elsewhere),
            )
            .await
            .unwrap();
        asked.recv().await.unwrap();
        // A key the issuer has just rotated to (a kid its fetched keys lack): the address's
        // requests are charged and wait for the keys to be fetched again, which the issuer
        // holds back, and their clients give up (deadlines, cancellations).
        let peer: IpAddr = "192.0.2.40".parse().unwrap();
        let valid = signed(&key, &iss, "svc");
        let body = valid.split('.').nth(1).unwrap().to_owned();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::json!({"alg": "RS256", "kid": "rotated"}).to_string());
        let rotated = Sensitive::new(format!("{header}.{body}.c2ln"));
        let waiting: Vec<_> = (0..burst)
            .map(|_| {
                let (v, t) = (verifier.clone(), rotated.clone());
                tokio::spawn(async move { v.verify(&t, Some(peer)).await })
            })
            .collect();
        asked.recv().await.unwrap();
        let address = crate::limits::address_key(peer);
        let failures = verifier.failures.as_ref().unwrap();
        while failures.peek(&address).is_ok() {
            tokio::task::yield_now().await;
        }
        for w in &waiting {
            w.abort();
        }
        for w in waiting {
            assert!(w.await.unwrap_err().is_cancelled());
        }
        // Nothing was found wrong with those tokens: the address's valid ones still verify.
        release.add_permits(100);
        let caller = verifier
            .verify(&Sensitive::new(valid), Some(peer))
            .await
            .unwrap();
        assert_eq!(caller.id, "jwt:held:svc");
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn a_fetch_for_a_new_kid_outlives_the_request_that_started_it() {
        let (key, iss, release, mut asked, verifier) = held_issuer(3, "sub").await;
        release.add_permits(1);
        let peer: IpAddr = "192.0.2.41".parse().unwrap();
        let valid = signed(&key, &iss, "svc");
        verifier
            .verify(&Sensitive::new(valid.clone()), Some(peer))
            .await
            .unwrap();
        asked.recv().await.unwrap();
        let issuer = verifier.issuers[&iss].clone();
        let first_fetched = issuer.keys.load_full().unwrap().fetched;
        let body = valid.split('.').nth(1).unwrap().to_owned();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::json!({"alg": "RS256", "kid": "rotated"}).to_string());
        let rotated = Sensitive::new(format!("{header}.{body}.c2ln"));
        // The first token with the new kid has the keys fetched; its client gives up while
        // the issuer is slow to answer.
        let first = {
            let (v, t) = (verifier.clone(), rotated.clone());
            tokio::spawn(async move { v.verify(&t, Some(peer)).await })
        };
        asked.recv().await.unwrap();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        // The fetch goes on and installs what the issuer answers: the next token with that
        // kid is checked against it, not refused unfetched until jwks_min_refresh.
        release.add_permits(100);
        tokio::time::timeout(Duration::from_secs(10), async {
            while issuer.keys.load_full().unwrap().fetched == first_fetched {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the keys fetched after their request was given up");
        assert_eq!(verifier.key_fetches("held"), 2);
    }

    #[cfg(feature = "emulator")]
    #[tokio::test]
    async fn valid_tokens_do_not_spend_their_address_s_failure_budget() {
        let burst = 3;
        let (key, iss, release, _asked, verifier) = held_issuer(burst, "sub").await;
        release.add_permits(100);
        let peer: IpAddr = "192.0.2.8".parse().unwrap();
        // More new valid tokens from one address than its burst of failures: all verify.
        for i in 0..10 {
            let token = Sensitive::new(signed(&key, &iss, &format!("caller-{i}")));
            let caller = verifier.verify(&token, Some(peer)).await.unwrap();
            assert!(
                caller.id.ends_with(&format!(":caller-{i}")),
                "{}",
                caller.id
            );
        }
        assert_eq!(verifier.signature_checks(), 10);
        let failures = verifier.failures.as_ref().unwrap();
        assert!(
            !failures.holds(&crate::limits::address_key(peer)),
            "an address whose tokens all verified holds no place in the bounded map"
        );
        // And the budget is whole: each of `burst` bad tokens still gets its full check.
        let other = signed(&key, &iss, "other");
        for i in 0..burst {
            let bad = forged(&signed(&key, &iss, &format!("bad-{i}")), &other);
            assert!(matches!(
                verifier.verify(&bad, Some(peer)).await,
                Err(JwtError::BadSignature)
            ));
        }
        let bad = forged(&signed(&key, &iss, "one-more"), &other);
        assert!(matches!(
            verifier.verify(&bad, Some(peer)).await,
            Err(JwtError::TooManyFailures { .. })
        ));
    }
}
