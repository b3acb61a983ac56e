//! Client-assertion JWTs (RFC 7523) for Entra ID: header and claims built here, the
//! SHA-256 digest of `header.claims` signed by a `Signer`, so no private key is ever local.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::{SigningAlgorithm, ThumbprintHeader};
use crate::sensitive::Sensitive;
use crate::signer::{CertificateInfo, Signer, SignerError};

/// Assertion lifetime. Entra recommends 5-10 minutes; the assertion is used once, at once.
pub const ASSERTION_LIFETIME_SECS: u64 = 300;

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5t: Option<&'a str>,
    #[serde(rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
    x5t_s256: Option<&'a str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    iat: u64,
    nbf: u64,
    exp: u64,
}

/// What an assertion is for.
#[derive(Debug, Clone, Copy)]
pub struct AssertionParams<'a> {
    /// The tenant's token endpoint: the assertion's audience.
    pub token_endpoint: &'a Url,
    pub client_id: &'a str,
    pub algorithm: SigningAlgorithm,
    pub thumbprint: ThumbprintHeader,
    /// Unix seconds.
    pub now: u64,
}

/// `base64url(header) . base64url(claims)`: the part that gets signed.
pub fn signing_input(p: &AssertionParams<'_>, cert: &CertificateInfo) -> String {
    let header = Header {
        alg: match p.algorithm {
            SigningAlgorithm::RS256 => "RS256",
            SigningAlgorithm::PS256 => "PS256",
        },
        typ: "JWT",
        x5t: matches!(p.thumbprint, ThumbprintHeader::X5t | ThumbprintHeader::Both)
            .then_some(cert.x5t.as_str()),
        x5t_s256: matches!(
            p.thumbprint,
            ThumbprintHeader::X5tS256 | ThumbprintHeader::Both
        )
        .then_some(cert.x5t_s256.as_str()),
    };
    let claims = Claims {
        aud: p.token_endpoint.as_str(),
        iss: p.client_id,
        sub: p.client_id,
        jti: uuid::Uuid::new_v4().to_string(),
        iat: p.now,
        nbf: p.now,
        exp: p.now + ASSERTION_LIFETIME_SECS,
    };
    // Serialising these plain structs to JSON cannot fail.
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let c = serde_json::to_vec(&claims).unwrap_or_default();
    let mut out = String::with_capacity(h.len() * 4 / 3 + c.len() * 4 / 3 + 4);
    URL_SAFE_NO_PAD.encode_string(h, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(c, &mut out);
    out
}

/// Builds and signs a client assertion with the certificate's key.
pub async fn build(
    signer: &dyn Signer,
    p: &AssertionParams<'_>,
    cert: &CertificateInfo,
) -> Result<Sensitive, SignerError> {
    let mut jwt = signing_input(p, cert);
    let digest: [u8; 32] = Sha256::digest(jwt.as_bytes()).into();
    let signature = signer.sign(&cert.key, p.algorithm, digest).await?;
    jwt.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut jwt);
    Ok(Sensitive::new(jwt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::KeyRef;

    fn cert() -> CertificateInfo {
        CertificateInfo {
            x5t: "sha1thumb".into(),
            x5t_s256: "sha256thumb".into(),
            key: KeyRef {
                vault_url: Url::parse("https://v.vault.azure.net").unwrap(),
                name: "k".into(),
                version: "1".into(),
            },
            version: "1".into(),
            not_after: None,
        }
    }

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn header_and_claims_follow_entra_certificate_credentials() {
        let endpoint = Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap();
        let p = AssertionParams {
            token_endpoint: &endpoint,
            client_id: "cid",
            algorithm: SigningAlgorithm::PS256,
            thumbprint: ThumbprintHeader::Both,
            now: 1_000,
        };
        let input = signing_input(&p, &cert());
        let (h, c) = input.split_once('.').unwrap();
        let h = decode(h);
        assert_eq!(h["alg"], "PS256");
        assert_eq!(h["typ"], "JWT");
        assert_eq!(h["x5t"], "sha1thumb");
        assert_eq!(h["x5t#S256"], "sha256thumb");
        let c = decode(c);
        assert_eq!(c["aud"], endpoint.as_str());
        assert_eq!(c["iss"], "cid");
        assert_eq!(c["sub"], "cid");
        assert_eq!(c["iat"], 1_000);
        assert_eq!(c["nbf"], 1_000);
        assert_eq!(c["exp"], 1_000 + ASSERTION_LIFETIME_SECS);
        assert!(c["exp"].as_u64().unwrap() - c["nbf"].as_u64().unwrap() <= 600);
        assert!(uuid::Uuid::parse_str(c["jti"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn default_header_names_only_the_sha1_thumbprint() {
        let endpoint = Url::parse("https://h/t/oauth2/v2.0/token").unwrap();
        let p = AssertionParams {
            token_endpoint: &endpoint,
            client_id: "cid",
            algorithm: SigningAlgorithm::RS256,
            thumbprint: ThumbprintHeader::X5t,
            now: 5,
        };
        let a = signing_input(&p, &cert());
        let b = signing_input(&p, &cert());
        let h = decode(a.split_once('.').unwrap().0);
        assert_eq!(h["alg"], "RS256");
        assert!(h.get("x5t#S256").is_none());
        // Every assertion gets its own jti, so Entra's replay check never trips.
        assert_ne!(a, b);
    }
}
