//! Key material: RSA key generation (aws-lc-rs, fast even for 3072 bits), self-signed Key
//! Vault certificates (rcgen), PEM import, prehashed-digest signing (the `rsa` crate, because
//! Key Vault signs a digest rather than a message), and the emulator's own JWT issuing key.
//!
//! Private keys never leave this module except as `Arc<RsaPrivateKey>` handles used to sign.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, Pss, RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::error::EmulatorError;

/// One version of a vault certificate with its key.
#[derive(Clone)]
pub(crate) struct CertVersion {
    pub version: String,
    pub der: Vec<u8>,
    /// base64url SHA-1 of the DER.
    pub x5t: String,
    /// base64url SHA-256 of the DER.
    pub x5t_s256: String,
    pub key: Arc<RsaPrivateKey>,
    pub public: RsaPublicKey,
    pub key_size: usize,
    pub subject: String,
    pub not_before: i64,
    pub expires: i64,
    pub created: i64,
    pub enabled: bool,
}

impl std::fmt::Debug for CertVersion {
    // The private key is deliberately left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertVersion")
            .field("version", &self.version)
            .field("x5t", &self.x5t)
            .field("key_size", &self.key_size)
            .finish_non_exhaustive()
    }
}

/// Signature algorithms the emulated Key Vault sign operation accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignAlg {
    Rs256,
    Ps256,
}

impl SignAlg {
    pub fn parse(alg: &str) -> Option<Self> {
        match alg {
            "RS256" => Some(Self::Rs256),
            "PS256" => Some(Self::Ps256),
            _ => None,
        }
    }
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    // Be lenient about padding, as Key Vault is.
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

pub(crate) fn b64std(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub(crate) fn thumbprints(der: &[u8]) -> (String, String) {
    (b64url(&Sha1::digest(der)), b64url(&Sha256::digest(der)))
}

/// Generates an RSA key with aws-lc-rs and returns it both as an rcgen key (to make the
/// certificate) and as an `rsa` key (to sign digests).
fn generate_rsa(bits: usize) -> Result<(rcgen::KeyPair, RsaPrivateKey), EmulatorError> {
    let size = match bits {
        2048 => rcgen::RsaKeySize::_2048,
        3072 => rcgen::RsaKeySize::_3072,
        4096 => rcgen::RsaKeySize::_4096,
        other => {
            return Err(EmulatorError::crypto(format!(
                "unsupported RSA size {other}"
            )));
        }
    };
    let kp = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
        .map_err(EmulatorError::crypto)?;
    let private =
        RsaPrivateKey::from_pkcs8_der(kp.serialized_der()).map_err(EmulatorError::crypto)?;
    Ok((kp, private))
}

/// A new self-signed certificate version, as Key Vault creates with `issuer: Self`, valid from
/// `now` (the emulator's clock).
pub(crate) fn self_signed_version(
    subject: &str,
    bits: usize,
    validity_days: u32,
    now: time::OffsetDateTime,
) -> Result<CertVersion, EmulatorError> {
    let (kp, private) = generate_rsa(bits)?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(EmulatorError::crypto)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    // Key Vault backdates nothing; a minute of slack keeps freshly made certs valid on skewed clocks.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(i64::from(validity_days));
    params.serial_number = Some(rcgen::SerialNumber::from(rand::random::<u64>() >> 1));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.self_signed(&kp).map_err(EmulatorError::crypto)?;
    let der = cert.der().to_vec();
    let (x5t, x5t_s256) = thumbprints(&der);
    let public = RsaPublicKey::from(&private);
    Ok(CertVersion {
        version: new_version_id(),
        der,
        x5t,
        x5t_s256,
        key: Arc::new(private),
        public,
        key_size: bits,
        subject: format!("CN={subject}"),
        not_before: params.not_before.unix_timestamp(),
        expires: params.not_after.unix_timestamp(),
        created: now.unix_timestamp(),
        enabled: true,
    })
}

/// Key Vault object versions are 32 lowercase hex digits.
pub(crate) fn new_version_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// One PEM block: its label and decoded contents.
fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = after[..label_end].to_owned();
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let Some(body_end) = body_start.find(&end_marker) else {
            break;
        };
        let body: String = body_start[..body_end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Ok(der) = STANDARD.decode(body) {
            out.push((label, der));
        }
        rest = &body_start[body_end + end_marker.len()..];
    }
    out
}

/// Imports a PEM bundle holding one certificate (the first) and its unencrypted RSA key;
/// `now` (the emulator's clock) becomes its `created` time.
pub(crate) fn import_pem(text: &str, now: i64) -> Result<CertVersion, String> {
    let blocks = pem_blocks(text);
    let der = blocks
        .iter()
        .find(|(l, _)| l == "CERTIFICATE")
        .map(|(_, d)| d.clone())
        .ok_or("no CERTIFICATE block in the PEM")?;
    let private = blocks
        .iter()
        .find_map(|(l, d)| match l.as_str() {
            "PRIVATE KEY" => RsaPrivateKey::from_pkcs8_der(d).ok(),
            "RSA PRIVATE KEY" => RsaPrivateKey::from_pkcs1_der(d).ok(),
            _ => None,
        })
        .ok_or("no unencrypted RSA private key (PRIVATE KEY or RSA PRIVATE KEY) in the PEM")?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let cert_public = RsaPublicKey::from_public_key_der(x509.public_key().raw)
        .map_err(|_| "the certificate's key is not RSA".to_owned())?;
    let public = RsaPublicKey::from(&private);
    if cert_public != public {
        return Err("the private key does not match the certificate".to_owned());
    }
    let (x5t, x5t_s256) = thumbprints(&der);
    let validity = x509.validity();
    Ok(CertVersion {
        version: new_version_id(),
        x5t,
        x5t_s256,
        key_size: public.size() * 8,
        subject: x509.subject().to_string(),
        not_before: validity.not_before.timestamp(),
        expires: validity.not_after.timestamp(),
        created: now,
        enabled: true,
        key: Arc::new(private),
        public,
        der,
    })
}

/// Signs a SHA-256 digest as Key Vault does (the digest is not hashed again).
pub(crate) fn sign_digest(
    key: &RsaPrivateKey,
    alg: SignAlg,
    digest: &[u8],
) -> Result<Vec<u8>, String> {
    let mut rng = rsa::rand_core::OsRng;
    let result = match alg {
        SignAlg::Rs256 => key.sign_with_rng(&mut rng, Pkcs1v15Sign::new::<Sha256>(), digest),
        SignAlg::Ps256 => key.sign_with_rng(&mut rng, Pss::new::<Sha256>(), digest),
    };
    result.map_err(|e| e.to_string())
}

/// Verifies a JWS signature over `signing_input` with an RSA public key.
pub(crate) fn verify_jws(
    public: &RsaPublicKey,
    alg: SignAlg,
    signing_input: &[u8],
    sig: &[u8],
) -> bool {
    let digest = Sha256::digest(signing_input);
    match alg {
        SignAlg::Rs256 => public
            .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, sig)
            .is_ok(),
        SignAlg::Ps256 => public.verify(Pss::new::<Sha256>(), &digest, sig).is_ok(),
    }
}

/// The public JWK of an RSA key (Key Vault's `key` object or a JWKS entry).
pub(crate) fn rsa_jwk(public: &RsaPublicKey) -> Value {
    json!({
        "kty": "RSA",
        "n": b64url(&public.n().to_bytes_be()),
        "e": b64url(&public.e().to_bytes_be()),
    })
}

/// The emulator's token-signing key: signs managed-identity and Entra access tokens.
pub(crate) struct IssuerKey {
    pub kid: String,
    pub public: RsaPublicKey,
    encoding: jsonwebtoken::EncodingKey,
    jwk: Value,
}

impl IssuerKey {
    pub fn generate() -> Result<Self, EmulatorError> {
        let cert = self_signed_version(
            "tokenbroker emulator token signing",
            2048,
            3650,
            time::OffsetDateTime::now_utc(),
        )?;
        let pkcs1 = cert.key.to_pkcs1_der().map_err(EmulatorError::crypto)?;
        let encoding = jsonwebtoken::EncodingKey::from_rsa_der(pkcs1.as_bytes());
        // Entra's signing keys use the certificate thumbprint as kid; do the same.
        let mut jwk = rsa_jwk(&cert.public);
        if let Value::Object(m) = &mut jwk {
            m.insert("use".into(), "sig".into());
            m.insert("kid".into(), cert.x5t.clone().into());
            m.insert("x5t".into(), cert.x5t.clone().into());
            m.insert("x5c".into(), json!([b64std(&cert.der)]));
        }
        Ok(Self {
            kid: cert.x5t.clone(),
            public: cert.public.clone(),
            encoding,
            jwk,
        })
    }

    /// Signs claims as an RS256 JWT with this key's `kid` (and `x5t`, as Entra does).
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        header.x5t = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| e.to_string())
    }

    /// JWKS document with this single key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk.clone()] })
    }
}

/// A compact JWS split into its parts, without any validation yet.
pub(crate) struct ParsedJwt {
    pub header: Value,
    pub claims: Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

pub(crate) fn parse_jwt(token: &str) -> Option<ParsedJwt> {
    let mut parts = token.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header = serde_json::from_slice(&b64url_decode(h)?).ok()?;
    let claims = serde_json::from_slice(&b64url_decode(c)?).ok()?;
    Some(ParsedJwt {
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature: b64url_decode(s)?,
    })
}

impl ParsedJwt {
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }
    pub fn claim_i64(&self, name: &str) -> Option<i64> {
        let v = self.claims.get(name)?;
        v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
    }
    /// `aud` may be a string or an array of strings.
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}
