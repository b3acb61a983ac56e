//! The PKCS#11 signer: a certificate and its RSA key on a hardware security module (or any
//! PKCS#11 token), found by the token's label and the key's label. The private key never
//! leaves the token. The broker logs in as the token's user with a PIN read from a file or
//! an environment variable that the configuration names: the configuration never holds it.
//!
//! A token is addressed by an RFC 7512 URI, `pkcs11:token=LABEL?module-path=PATH`, which
//! stands where a Key Vault URL stands for the `Signer` seam; the key's label is the
//! certificate's name. PKCS#11 is a blocking C interface, so every call runs on tokio's
//! blocking pool. A module is loaded and initialised once per process (`C_Initialize` is
//! per process); a token keeps a few idle sessions, since a session serves one thread at a
//! time, and a login holds for every session of the process on that token.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};
use url::Url;
use x509_parser::public_key::PublicKey;
use zeroize::Zeroizing;

use super::{CertificateInfo, KeyRef, Signer, SignerError};
use crate::config::{PinSource, SigningAlgorithm};

/// How the service is named in errors and metrics.
pub const SERVICE: &str = "the HSM";

/// The code of a token that no slot holds, at start or later (removed, reset, or never
/// there): the operator's to fix, so FAILED_PRECONDITION, looked for again at the next fetch.
pub const TOKEN_NOT_PRESENT: &str = "TokenNotPresent";

/// Idle sessions kept per token; more are opened when signs overlap, and closed after.
const IDLE_SESSIONS: usize = 4;

/// Calls to one token at a time, those given up on but not returned included; as many
/// sessions at most.
const CALLS: usize = 16;

/// DER `DigestInfo` prefix for SHA-256 (RFC 8017, 9.2): `CKM_RSA_PKCS` signs what it is
/// given, so RS256 over a digest made here needs it.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// The RFC 7512 URI of `token` in `module`.
pub fn token_url(module: &Path, token: &str) -> Result<Url, url::ParseError> {
    let enc = |s: &str| -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
    };
    Url::parse(&format!(
        "pkcs11:token={}?module-path={}",
        enc(token),
        enc(&module.to_string_lossy())
    ))
}

/// One configured token: where it is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub module: PathBuf,
    pub label: String,
    pub pin: PinSource,
}

/// Signs with keys on PKCS#11 tokens, one entry per configured token.
pub struct Pkcs11Signer {
    tokens: HashMap<String, Arc<Token>>,
    /// How long one call (a session, a login, a sign) may take.
    timeout: Duration,
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("tokens", &self.tokens.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct Token {
    ctx: Pkcs11,
    label: String,
    pin: PinSource,
    /// The slot the token was last found in (tokens can move between slots).
    slot: Mutex<Option<Slot>>,
    idle: Mutex<Vec<Session>>,
    /// The PIN the token last refused, not offered again while the refusal holds.
    refused: Mutex<Refusal>,
    calls: Arc<tokio::sync::Semaphore>,
}

impl Pkcs11Signer {
    /// Loads and initialises each token's module (once per module). Nothing is logged in
    /// yet: a token that is absent at start fails its tenant's fetches, not the broker.
    pub fn new(tokens: &[TokenConfig], timeout: Duration) -> Result<Self, SignerError> {
        let mut modules: HashMap<PathBuf, Pkcs11> = HashMap::new();
        let mut out = HashMap::new();
        for t in tokens {
            let ctx = match modules.get(&t.module) {
                Some(c) => c.clone(),
                None => {
                    let c = load(&t.module)?;
                    modules.insert(t.module.clone(), c.clone());
                    c
                }
            };
            let url = token_url(&t.module, &t.label)
                .map_err(|e| other(format!("token `{}`: {e}", t.label)))?;
            out.insert(
                url.to_string(),
                Arc::new(Token {
                    ctx,
                    label: t.label.clone(),
                    pin: t.pin.clone(),
                    slot: Mutex::new(None),
                    idle: Mutex::new(Vec::new()),
                    refused: Mutex::new(Refusal::default()),
                    calls: Arc::new(tokio::sync::Semaphore::new(CALLS)),
                }),
            );
        }
        Ok(Pkcs11Signer {
            tokens: out,
            timeout,
        })
    }

    fn token(&self, url: &Url) -> Result<Arc<Token>, SignerError> {
        self.tokens.get(url.as_str()).cloned().ok_or_else(|| {
            configuration(
                "TokenNotConfigured",
                format!("token {url} is not configured on this broker (it is read at start)"),
            )
        })
    }

    /// Runs `op` with a logged-in session of `token` on the blocking pool.
    async fn with_session<T: Send + 'static>(
        &self,
        token: Arc<Token>,
        op: impl Fn(&Session) -> Result<T, SignerError> + Send + 'static,
    ) -> Result<T, SignerError> {
        bounded(self.timeout, token.calls.clone(), move || token.run(op)).await
    }
}

/// `call` on the blocking pool, waited for at most `timeout`. A network HSM that stops
/// answering blocks its C call for as long as its client library says; the fetch must not
/// wait that long (its caller and every caller joined to it would). The blocked thread is
/// left to finish on its own, holding one of the token's `calls` until it does: so a token
/// that stops answering holds a few blocking threads, not one more per fetch for as long as
/// it is down (the pool is shared: host names are resolved on it), and overlapping signs
/// open as many sessions at most. The breaker stops new calls after a few such failures.
async fn bounded<T: Send + 'static>(
    timeout: Duration,
    calls: Arc<tokio::sync::Semaphore>,
    call: impl FnOnce() -> Result<T, SignerError> + Send + 'static,
) -> Result<T, SignerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let unavailable = |message: String| SignerError::Unavailable {
        service: SERVICE,
        message,
        retry_after: None,
        throttled: false,
    };
    // The semaphore is never closed, so waiting for it ends only with a permit or the time.
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, calls.acquire_owned()).await else {
        return Err(unavailable(format!(
            "the broker's calls to the PKCS#11 module that have not returned are as many as it allows ({CALLS} per token), and none returned within {timeout:?}"
        )));
    };
    let call = move || {
        let _permit = permit;
        call()
    };
    match tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(r)) => r,
        // A panic's message is for the log, not for callers.
        Ok(Err(e)) => {
            tracing::error!(error = %e, "a PKCS#11 call ended without a result");
            Err(other(
                "a PKCS#11 call ended without a result; see the broker's log".into(),
            ))
        }
        Err(_) => Err(unavailable(format!(
            "no answer from the PKCS#11 module within {timeout:?}"
        ))),
    }
}

fn load(module: &Path) -> Result<Pkcs11, SignerError> {
    let ctx = Pkcs11::new(module).map_err(|e| {
        other(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(classify(e, &format!("PKCS#11 module {}", module.display()))),
    }
}

impl Token {
    /// `op` on a session (idle or new), logging in first when the token says it must;
    /// once more on a fresh session if the token was removed or reset meanwhile.
    fn run<T>(&self, op: impl Fn(&Session) -> Result<T, SignerError>) -> Result<T, SignerError> {
        let mut retried = false;
        loop {
            let session = self.session()?;
            match op(&session) {
                // A private key is invisible without a login, and objects with their token,
                // so any failure can be either.
                Err(_) if !retried && (!logged_in(&session) || !self.still_present()) => {
                    // The session died with its token (removed, reset) or lost its login
                    // (another client of the token logged out), or its token is gone while
                    // the module keeps the session (SoftHSM's): drop it and every idle one,
                    // and try once more from the start, where a token no slot holds is
                    // named as absent, as at start.
                    retried = true;
                    self.forget();
                }
                r => {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < IDLE_SESSIONS {
                        idle.push(session);
                    }
                    return r;
                }
            }
        }
    }

    /// Forgets the token's slot and idle sessions: the next session looks for it anew.
    fn forget(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the slot the token was found in still holds it.
    fn still_present(&self) -> bool {
        let slot = *self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.is_some_and(|s| {
            self.ctx
                .get_token_info(s)
                .is_ok_and(|i| i.label().trim_end() == self.label)
        })
    }

    fn session(&self) -> Result<Session, SignerError> {
        if let Some(s) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(s);
        }
        let session = match self.ctx.open_ro_session(self.slot()?) {
            // The token left the slot it was found in (removed, or reset into another slot,
            // as a re-initialised token is): look for it again, once, rather than fail on a
            // slot that will never hold it again.
            Err(CkError::Pkcs11(
                RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::DeviceRemoved,
                _,
            )) => {
                self.forget();
                self.ctx.open_ro_session(self.slot()?)
            }
            r => r,
        }
        .map_err(|e| classify(e, &self.what()))?;
        // A login holds for every session of the process: only the first needs one.
        if !logged_in(&session) {
            self.login(&session)?;
        }
        Ok(session)
    }

    fn login(&self, session: &Session) -> Result<(), SignerError> {
        let (pin, digest) = self.pin()?;
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rv, message)) = refused.refuses(&digest, std::time::Instant::now()) {
            return Err(SignerError::Forbidden {
                service: SERVICE,
                status: 0,
                code: format!("CKR_{rv:?}"),
                message: format!("{}: {message}", self.what()),
            });
        }
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                *refused = Refusal::default();
                Ok(())
            }
            Err(e) => {
                if let CkError::Pkcs11(rv, _) = &e {
                    refused.record(digest, *rv, std::time::Instant::now());
                }
                Err(classify(e, &self.what()))
            }
        }
    }

    fn slot(&self) -> Result<Slot, SignerError> {
        if let Some(s) = *self.slot.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(s);
        }
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| classify(e, &self.what()))?;
        for s in slots {
            if let Ok(info) = self.ctx.get_token_info(s)
                && info.label().trim_end() == self.label
            {
                *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                return Ok(s);
            }
        }
        Err(SignerError::NotFound {
            service: SERVICE,
            what: self.what(),
            code: TOKEN_NOT_PRESENT.into(),
            message: "no slot of the module holds a token with this label".into(),
        })
    }

    /// The user PIN, read when a login needs it (so a rotated PIN file is read again), and
    /// its SHA-256 (kept to recognise a refused PIN, never shown).
    fn pin(&self) -> Result<(AuthPin, [u8; 32]), SignerError> {
        let pin = Zeroizing::new(match &self.pin {
            PinSource::File(path) => read_pin_file(path)?,
            PinSource::Env(name) => std::env::var(name).map_err(|_| SignerError::Forbidden {
                service: SERVICE,
                status: 0,
                code: "PinUnset".into(),
                message: format!("the environment variable {name} holding the PIN is not set"),
            })?,
        });
        // A file written by `echo` ends with a newline that is not part of the PIN.
        let pin = pin.trim_end_matches(['\r', '\n']);
        // An empty one is a secret not filled in yet: offered, the token would count it as a
        // wrong PIN towards locking its user.
        if pin.is_empty() {
            let source = match &self.pin {
                PinSource::File(path) => format!("the PIN file {}", path.display()),
                PinSource::Env(name) => format!("the environment variable {name}"),
            };
            return Err(SignerError::Forbidden {
                service: SERVICE,
                status: 0,
                code: "PinEmpty".into(),
                message: format!(
                    "{source} is empty, and is not offered to the token: put the token user's PIN in it"
                ),
            });
        }
        Ok((AuthPin::from(pin), Sha256::digest(pin.as_bytes()).into()))
    }

    fn what(&self) -> String {
        format!("PKCS#11 token `{}`", self.label)
    }
}

/// How long a PIN the token answered CKR_PIN_LOCKED is not offered again. Offering a PIN to
/// a locked user cannot lock it further, and the token's security officer may unlock it:
/// the same (right) PIN then logs in again without a restart.
const LOCKED_RETRY: Duration = Duration::from_secs(60);

/// The PIN the token last refused (its SHA-256, never shown), why, and when.
#[derive(Default)]
struct Refusal(Option<([u8; 32], RvError, std::time::Instant)>);

impl Refusal {
    /// Remembers a login refusal that offering the same PIN again would repeat. An HSM
    /// locks its user after a few wrong PINs, so a PIN refused as incorrect is never offered
    /// twice: only a changed PIN (a rewritten PIN file) is tried again.
    fn record(&mut self, digest: [u8; 32], rv: RvError, now: std::time::Instant) {
        if matches!(
            rv,
            RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired
        ) {
            self.0 = Some((digest, rv, now));
        }
    }

    /// Whether the PIN `digest` is not to be offered now: the refusal's code and what to do.
    fn refuses(
        &self,
        digest: &[u8; 32],
        now: std::time::Instant,
    ) -> Option<(RvError, &'static str)> {
        let (bad, rv, at) = self.0.as_ref()?;
        if bad != digest {
            return None;
        }
        if *rv == RvError::PinLocked {
            return (now.saturating_duration_since(*at) < LOCKED_RETRY).then_some((
                *rv,
                "the token's user is locked; once its security officer unlocks it the PIN is offered again (within a minute)",
            ));
        }
        Some((
            *rv,
            "the token refused this PIN before; it is not offered again, so the token does not lock its user: put the right PIN in place",
        ))
    }
}

/// The most a PIN file may hold. A PIN is a few dozen bytes at most; the bound keeps a
/// mistaken path (a log, a device) from being read whole into memory, and offered.
const PIN_FILE_MAX: u64 = 4096;

/// The PIN file's content: a regular file of at most `PIN_FILE_MAX` bytes. A FIFO would
/// block its reader (a blocking thread, and the token's call) until something writes to
/// it, and a device such as /dev/urandom never ends; neither is read. Its content is never
/// put in an error.
fn read_pin_file(path: &Path) -> Result<String, SignerError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| SignerError::Forbidden {
        service: SERVICE,
        status: 0,
        code: "PinUnreadable".into(),
        message: format!("cannot read the PIN file {}: {e}", path.display()),
    };
    // Follows symbolic links, as a mounted secret's file is one.
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(configuration(
            "PinFileNotRegular",
            format!(
                "the PIN file {} is not a regular file (a FIFO, a device or a directory): point pin_file at a file holding the token user's PIN",
                path.display()
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(unreadable)?;
    // Room for one byte past the bound, so that a longer file is told apart; reserved up
    // front so that the PIN is not copied by a reallocation and left behind unzeroed.
    let cap = usize::try_from(PIN_FILE_MAX + 1).unwrap_or(usize::MAX);
    let mut bytes = Zeroizing::new(Vec::with_capacity(cap));
    file.take(PIN_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > PIN_FILE_MAX {
        return Err(configuration(
            "PinFileTooLarge",
            format!(
                "the PIN file {} holds more than {PIN_FILE_MAX} bytes, and is not read: a PIN is short; point pin_file at a file holding the token user's PIN alone",
                path.display()
            ),
        ));
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(pin) => Ok(pin),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(unreadable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "it is not UTF-8 text",
            )))
        }
    }
}

/// Whether `session` is open and logged in as the user (a session of a removed or reset
/// token, or one whose login ended, is not).
fn logged_in(session: &Session) -> bool {
    matches!(
        session.get_session_info().map(|i| i.session_state()),
        Ok(SessionState::RoUser | SessionState::RwUser)
    )
}

/// A private key labelled as configured, with its certificate.
struct Candidate {
    key: ObjectHandle,
    der: Vec<u8>,
    /// The certificate's thumbprint, which is its version.
    version: String,
    not_before: i64,
    not_after: i64,
}

/// Every private key labelled `label`, each with its certificate. During a rotation a token
/// holds the new key and certificate beside the old ones under the same label.
fn candidates(session: &Session, token: &str, label: &str) -> Result<Vec<Candidate>, SignerError> {
    let what = || format!("key `{label}` on token `{token}`");
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| classify(e, &what()))?;
    if keys.is_empty() {
        return Err(SignerError::NotFound {
            service: SERVICE,
            what: format!("private key `{label}` on token `{token}`"),
            code: "KeyNotFound".into(),
            message: "no private key has this label (or the PIN's user cannot see it)".into(),
        });
    }
    let paired_by_id = keys.len() > 1;
    let all = keys.into_iter().map(|key| {
            let mut id = Vec::new();
            let mut key_type = None;
            for a in session
                .get_attributes(key, &[AttributeType::Id, AttributeType::KeyType])
                .map_err(|e| classify(e, &what()))?
            {
                match a {
                    Attribute::Id(v) => id = v,
                    Attribute::KeyType(t) => key_type = Some(t),
                    _ => {}
                }
            }
            let mut modulus = None;
            if key_type == Some(KeyType::RSA) {
                for a in session
                    .get_attributes(key, &[AttributeType::Modulus])
                    .map_err(|e| classify(e, &what()))?
                {
                    if let Attribute::Modulus(m) = a {
                        modulus = Some(m);
                    }
                }
            }
            // RS256 and PS256 sign with RSA: another key would be refused only at the sign,
            // by a code that reads as a key not found, and after its certificate was read.
            if let Some(t) = key_type.filter(|t| *t != KeyType::RSA) {
                let kind = if t == KeyType::EC {
                    "an EC key".to_owned()
                } else {
                    format!("a key of type {t}")
                };
                return Err(configuration(
                    "KeyNotRsa",
                    format!(
                        "private key `{label}` on token `{token}` is {kind}, and RS256 and PS256 sign with an RSA key: put an RSA key (2048 bits or more) and its certificate on the token under this label"
                    ),
                ));
            }
            if paired_by_id && id.is_empty() {
                return Err(configuration(
                    "KeyIdMissing",
                    format!(
                        "several private keys on token `{token}` are labelled `{label}` and one has no CKA_ID: give each key the CKA_ID of its certificate"
                    ),
                ));
            }
            let der = certificate_der(session, token, label, &id)?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                configuration(
                    "CertificateUnreadable",
                    format!(
                        "the certificate of key `{label}` on token `{token}` is not X.509 DER: {e}"
                    ),
                )
            })?;
            // The certificate found by CKA_ID (or label) must be this key's: another key's
            // would put its thumbprint on assertions this key signs, which Entra refuses
            // as a bad signature, naming nothing on the token.
            if let (Some(key_modulus), Ok(PublicKey::RSA(rsa))) =
                (&modulus, cert.public_key().parsed())
                && unsigned(key_modulus) != unsigned(rsa.modulus)
            {
                return Err(configuration(
                    "CertificateKeyMismatch",
                    format!(
                        "the certificate paired with key `{label}` on token `{token}` (by {}) is not that key's: its public key differs; give the key's certificate the key's CKA_ID, and no other certificate that CKA_ID",
                        if id.is_empty() { "label" } else { "CKA_ID" }
                    ),
                ));
            }
            let validity = cert.validity();
            let (not_before, not_after) = (
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            );
            Ok(Candidate {
                key,
                version: hex(&Sha256::digest(&der)[..8]),
                der,
                not_before,
                not_after,
            })
        });
    let mut found = Vec::new();
    let mut without_certificate = None;
    for candidate in all {
        match candidate {
            Ok(c) => found.push(c),
            // A key whose certificate is not on the token yet (a rotation's new key, made on
            // the token before its certificate is issued) is passed over while another key
            // under the label has one: it cannot sign an assertion Entra would accept.
            Err(e) if paired_by_id && is_without_certificate(&e) => {
                without_certificate.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match without_certificate {
        Some(e) if found.is_empty() => Err(e),
        _ => Ok(found),
    }
}

const CERTIFICATE_NOT_FOUND: &str = "CertificateNotFound";

/// A big-endian unsigned integer without its leading zeros (DER adds one to keep it positive).
fn unsigned(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[zeros..]
}

fn is_without_certificate(e: &SignerError) -> bool {
    matches!(e, SignerError::NotFound { code, .. } if code == CERTIFICATE_NOT_FOUND)
}

/// The candidate to sign with from now on: the newest certificate (latest start) that is
/// valid now, else the newest at all (an expired one is Entra's to refuse, with its reason).
fn current(mut all: Vec<Candidate>) -> Option<Candidate> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    all.sort_by_key(|c| (c.not_before <= now && now <= c.not_after, c.not_before));
    all.pop()
}

/// The DER certificate of a key labelled `label`: by the key's CKA_ID (how a key and its
/// certificate are paired on a token), else, for a key without one, by the same label.
fn certificate_der(
    session: &Session,
    token: &str,
    label: &str,
    id: &[u8],
) -> Result<Vec<u8>, SignerError> {
    let what = || format!("certificate of key `{label}` on token `{token}`");
    let by = if id.is_empty() {
        Attribute::Label(label.as_bytes().to_vec())
    } else {
        Attribute::Id(id.to_vec())
    };
    let found = session
        .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE), by])
        .map_err(|e| classify(e, &what()))?;
    // Keys under different labels may share a CKA_ID (each label's key numbered from 1,
    // say): then the certificate under the key's label is the key's.
    let found = if found.len() > 1 && !id.is_empty() {
        let labelled = session
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| classify(e, &what()))?;
        if labelled.is_empty() { found } else { labelled }
    } else {
        found
    };
    match found.as_slice() {
        [c] => {
            let value = session
                .get_attributes(*c, &[AttributeType::Value])
                .map_err(|e| classify(e, &what()))?;
            value
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                })
                .ok_or_else(|| {
                    configuration("CertificateUnreadable", format!("the {} has no value", what()))
                })
        }
        [] => Err(SignerError::NotFound {
            service: SERVICE,
            what: what(),
            code: CERTIFICATE_NOT_FOUND.into(),
            message: "no certificate object has the key's CKA_ID (or, without one, its label): store the certificate on the token beside its key".into(),
        }),
        many => Err(configuration(
            "CertificateAmbiguous",
            format!(
                "{} certificates on token `{token}` match key `{label}`: keep one per key",
                many.len()
            ),
        )),
    }
}

#[async_trait]
impl Signer for Pkcs11Signer {
    async fn certificate(
        &self,
        token_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError> {
        let token = self.token(token_url)?;
        let (label, name_owned, url) = (token.label.clone(), name.to_owned(), token_url.clone());
        self.with_session(token, move |s| {
            let Some(c) = current(candidates(s, &label, &name_owned)?) else {
                return Err(other(format!("no key `{name_owned}` on token `{label}`")));
            };
            let not_after = u64::try_from(c.not_after)
                .ok()
                .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s));
            let key = KeyRef {
                vault_url: url.clone(),
                name: name_owned.clone(),
                version: c.version,
            };
            Ok(CertificateInfo::of_der(&c.der, key, not_after))
        })
        .await
    }

    async fn sign(
        &self,
        key: &KeyRef,
        algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        let token = self.token(&key.vault_url)?;
        let (label, name, version) = (token.label.clone(), key.name.clone(), key.version.clone());
        self.with_session(token, move |s| {
            // The key of the certificate the assertion names, whichever is current now.
            let Some(c) = candidates(s, &label, &name)?
                .into_iter()
                .find(|c| c.version == version)
            else {
                return Err(SignerError::NotFound {
                    service: SERVICE,
                    what: format!(
                        "the key of certificate version {version} (`{name}` on token `{label}`)"
                    ),
                    code: "KeyVersionNotFound".into(),
                    message: "it was removed from the token since its certificate was read".into(),
                });
            };
            let what = format!("signing with key `{name}` on token `{label}`");
            match algorithm {
                SigningAlgorithm::RS256 => {
                    let mut input = SHA256_DIGEST_INFO.to_vec();
                    input.extend_from_slice(&digest);
                    s.sign(&Mechanism::RsaPkcs, c.key, &input)
                }
                SigningAlgorithm::PS256 => {
                    let params = PkcsPssParams {
                        hash_alg: MechanismType::SHA256,
                        mgf: PkcsMgfType::MGF1_SHA256,
                        s_len: 32.into(),
                    };
                    s.sign(&Mechanism::RsaPkcsPss(params), c.key, &digest)
                }
            }
            .map_err(|e| classify(e, &what))
        })
        .await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| crate::sensitive::hex_digits(b))
        .map(char::from)
        .collect()
}

fn other(message: String) -> SignerError {
    SignerError::Other {
        service: SERVICE,
        message,
    }
}

/// The token's objects, or the broker's configuration of it, cannot work as they are: the
/// operator's to fix, like a key that cannot sign (`classify`).
fn configuration(code: &str, message: String) -> SignerError {
    SignerError::Configuration {
        service: SERVICE,
        code: code.into(),
        message,
    }
}

/// Sorts a PKCS#11 failure into the broker's signer errors.
fn classify(e: CkError, what: &str) -> SignerError {
    let CkError::Pkcs11(rv, function) = e else {
        return other(format!("{what}: {e}"));
    };
    let code = format!("CKR_{rv:?}");
    let message = format!("{what}: {function:?} returned {code}");
    match rv {
        // The token left between finding its slot and this call: as when no slot holds it.
        RvError::TokenNotPresent | RvError::TokenNotRecognized | RvError::SlotIdInvalid => {
            SignerError::NotFound {
                service: SERVICE,
                what: what.to_owned(),
                code: TOKEN_NOT_PRESENT.into(),
                message: format!("{function:?} returned {code}"),
            }
        }
        RvError::PinIncorrect
        | RvError::PinLocked
        | RvError::PinExpired
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::UserPinNotInitialized
        | RvError::UserNotLoggedIn => SignerError::Forbidden {
            service: SERVICE,
            status: 0,
            code,
            message,
        },
        RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::SessionClosed
        | RvError::SessionHandleInvalid
        | RvError::SessionCount
        | RvError::HostMemory
        | RvError::FunctionFailed
        | RvError::GeneralError => SignerError::Unavailable {
            service: SERVICE,
            message,
            retry_after: None,
            throttled: false,
        },
        // The key went between finding it and using it.
        RvError::KeyHandleInvalid => SignerError::NotFound {
            service: SERVICE,
            what: what.to_owned(),
            code,
            message: "the key was removed from the token".into(),
        },
        // There, but unable to sign: the operator's to fix, and asking again will not help.
        RvError::KeyTypeInconsistent
        | RvError::KeyFunctionNotPermitted
        | RvError::MechanismInvalid => configuration(
            &code,
            format!(
                "{message}: the key cannot sign with this algorithm (an RSA key whose CKA_SIGN is true is needed, and for PS256 a token that offers CKM_RSA_PKCS_PSS)"
            ),
        ),
        _ => other(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(n: usize) -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(n))
    }

    // A module that stops answering keeps a blocking thread per call given up on: after a
    // token's share, no more are started (the blocking pool also resolves every upstream's
    // host names, so a long HSM outage must not fill it), and a call returning frees its own.
    // A locked user is unlocked by the token's security officer: the same PIN is offered
    // again after a while. A PIN refused as incorrect is never offered twice.
    #[test]
    fn a_locked_pin_is_offered_again_after_a_while_and_a_wrong_one_never() {
        let start = std::time::Instant::now();
        let (pin, other) = ([1; 32], [2; 32]);
        let mut r = Refusal::default();
        r.record(pin, RvError::PinLocked, start);
        let (rv, message) = r.refuses(&pin, start).unwrap();
        assert_eq!(rv, RvError::PinLocked);
        assert!(message.contains("security officer"), "{message}");
        assert!(r.refuses(&other, start).is_none());
        assert!(r.refuses(&pin, start + LOCKED_RETRY).is_none());

        r.record(pin, RvError::PinIncorrect, start);
        let later = start + Duration::from_secs(365 * 24 * 3600);
        let (rv, message) = r.refuses(&pin, later).unwrap();
        assert_eq!(rv, RvError::PinIncorrect);
        assert!(message.contains("not offered again"), "{message}");
        assert!(r.refuses(&other, later).is_none());

        // Other failures (a token that went away) leave the refusal as it was.
        r.record(other, RvError::DeviceRemoved, later);
        assert!(r.refuses(&pin, later).is_some());
    }

    #[tokio::test]
    async fn calls_a_module_has_not_returned_are_bounded_per_token() {
        let limit = calls(2);
        let mut release = Vec::new();
        for _ in 0..2 {
            let (tx, held) = std::sync::mpsc::channel::<()>();
            release.push(tx);
            let r = bounded(Duration::from_millis(50), limit.clone(), move || {
                let _ = held.recv();
                Ok(())
            })
            .await;
            assert!(matches!(r, Err(SignerError::Unavailable { .. })), "{r:?}");
        }
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let r = bounded(Duration::from_millis(50), limit.clone(), move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .await;
        match r {
            Err(SignerError::Unavailable { message, .. }) => {
                assert!(message.contains("have not returned"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
        // One returns: its place is free again.
        let _ = release.pop().map(|tx| tx.send(()));
        let _ = limit.clone().acquire_owned().await.map(drop);
        assert_eq!(
            bounded(Duration::from_secs(10), limit, || Ok(7))
                .await
                .unwrap(),
            7
        );
        for tx in release {
            let _ = tx.send(());
        }
    }

    // On real time: tokio's paused clock does not advance while a blocking task runs.
    #[tokio::test]
    async fn a_call_that_does_not_return_is_unavailable_after_the_timeout() {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let r = bounded(Duration::from_millis(50), calls(1), move || {
            let _ = held.recv();
            Ok(())
        })
        .await;
        let _ = release.send(());
        match r {
            Err(SignerError::Unavailable { message, .. }) => {
                assert!(message.contains("within 50ms"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            bounded(Duration::from_secs(10), calls(1), || Ok(7))
                .await
                .unwrap(),
            7
        );
    }

    #[tokio::test]
    async fn a_call_that_panics_tells_callers_no_more_than_that() {
        let r: Result<(), _> = bounded(Duration::from_secs(10), calls(1), || {
            panic!("module state 0xdeadbeef at slot 3")
        })
        .await;
        let message = r.unwrap_err().to_string();
        assert!(message.contains("ended without a result"), "{message}");
        assert!(!message.contains("deadbeef"), "{message}");
    }

    #[test]
    fn a_refusal_without_an_http_status_names_only_its_code() {
        let e = SignerError::Forbidden {
            service: SERVICE,
            status: 0,
            code: "CKR_PinIncorrect".into(),
            message: "m".into(),
        };
        assert!(e.to_string().contains("(CKR_PinIncorrect)"), "{e}");
    }

    #[tokio::test]
    async fn a_token_the_broker_was_not_configured_with_is_a_configuration_error() {
        let signer = Pkcs11Signer::new(&[], Duration::from_secs(1)).unwrap();
        let url = token_url(Path::new("/no/module.so"), "absent").unwrap();
        match signer.certificate(&url, "k").await {
            Err(SignerError::Configuration { code, message, .. }) => {
                assert_eq!(code, "TokenNotConfigured");
                assert!(message.contains("not configured"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
