//! Who is calling: turns what a request carries (a verified client certificate, an
//! `authorization: Bearer` JWT, or, in development only, nothing on a plaintext loopback
//! listener) into a caller identity, or refuses it with the reason. Identities are plain
//! strings, the same ones the policy names and the audit records:
//!
//! - `spiffe://TRUST-DOMAIN/PATH`: a client certificate's SPIFFE ID (URI SAN);
//! - `dns:HOST`: otherwise the certificate's first DNS SAN, lower case;
//! - `jwt:ISSUER-NAME:VALUE`: a bearer token from a configured issuer, VALUE being its
//!   identity claim (`sub` by default; `oid` or `appid` for Entra);
//! - `dev:loopback`: no credentials, plaintext, loopback (`tokenbroker dev` only).
//!
//! When a request carries both a client certificate and a bearer token, the bearer token
//! names the caller: the certificate then only authenticates the connection (a mesh sidecar).

pub mod jwt;
pub mod mtls;

use std::net::SocketAddr;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::config::{CallersConfig, LimitsConfig};
use crate::sensitive::Sensitive;

pub use jwt::{JwtError, JwtVerifier};

/// The development identity: a request with no credentials, on a plaintext listener bound to
/// loopback, from a loopback peer, with `callers.dev_loopback = true`.
pub const DEV_LOOPBACK: &str = "dev:loopback";

/// How a caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proof {
    Mtls,
    Jwt,
    DevLoopback,
}

impl Proof {
    /// The name in the audit log (as serialised).
    pub fn name(self) -> &'static str {
        match self {
            Proof::Mtls => "mtls",
            Proof::Jwt => "jwt",
            Proof::DevLoopback => "dev_loopback",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity the policy matches and the audit records.
    pub id: String,
    pub proof: Proof,
    /// For bearer tokens: the client application (`azp` or `appid`), when the token names one.
    pub app_id: Option<String>,
    /// When the credential stops being accepted (a bearer token's `exp` plus the issuer's
    /// leeway, a client certificate's `notAfter`): a watch it opened ends then. `None` for
    /// the development identity.
    pub valid_until: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error(
        "no caller credentials: present a client certificate (mutual TLS) or an `authorization: Bearer <jwt>` header"
    )]
    Missing,
    #[error("the authorization header is not `Bearer <jwt>`")]
    NotBearer,
    #[error("client certificate: {0}")]
    Certificate(String),
    #[error("bearer token: {0}")]
    Jwt(#[from] JwtError),
}

/// A client certificate the TLS handshake verified.
#[derive(Debug, Clone, Copy)]
pub enum ClientCert<'a> {
    /// Its identity, already read from it once for the connection (`tls::TlsPeer`).
    Identity(&'a Result<mtls::CertIdentity, String>),
    /// The leaf certificate itself, to read the identity from.
    Leaf(&'a CertificateDer<'static>),
}

/// What a request carries that can prove who sent it.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    pub client_cert: Option<ClientCert<'a>>,
    /// The raw `authorization` header.
    pub authorization: Option<Sensitive>,
    pub remote_addr: Option<SocketAddr>,
}

/// Authenticates requests according to the `[callers]` configuration.
#[derive(Debug)]
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    dev_loopback: bool,
}

impl Authenticator {
    /// `dev_loopback` is honoured only because configuration validation accepts it solely
    /// with a plaintext listener on a loopback address.
    /// `limits` gives the limit of failed bearer-token authentications per address.
    pub fn new(
        config: &CallersConfig,
        limits: &LimitsConfig,
        http: reqwest::Client,
    ) -> Authenticator {
        let jwt = (!config.issuers.is_empty()).then(|| {
            JwtVerifier::new(
                config.issuers.values().cloned().collect(),
                http,
                crate::limits::failed_auth(limits),
                config.remember,
            )
        });
        Authenticator {
            jwt,
            dev_loopback: config.dev_loopback,
        }
    }

    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.jwt.as_ref()
    }

    pub async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Caller, AuthnError> {
        if let Some(header) = &creds.authorization {
            let token = bearer(header)?;
            let Some(jwt) = &self.jwt else {
                return Err(JwtError::NoIssuers.into());
            };
            return Ok(jwt
                .verify(&token, creds.remote_addr.map(|a| a.ip()))
                .await?);
        }
        if let Some(cert) = creds.client_cert {
            let cert = match cert {
                ClientCert::Identity(id) => (*id).clone(),
                ClientCert::Leaf(leaf) => mtls::identity(leaf),
            }
            .map_err(AuthnError::Certificate)?;
            // The handshake checked the validity period once; a connection lives on after
            // it, and so would the certificate's power without this.
            if SystemTime::now() >= cert.not_after {
                return Err(AuthnError::Certificate(format!(
                    "expired at {}; connect again with a renewed certificate",
                    crate::audit::rfc3339(cert.not_after)
                )));
            }
            return Ok(Caller {
                id: cert.id,
                proof: Proof::Mtls,
                app_id: None,
                valid_until: Some(cert.not_after),
            });
        }
        if self.dev_loopback
            && creds.client_cert.is_none()
            && creds.remote_addr.is_some_and(|a| a.ip().is_loopback())
        {
            return Ok(Caller {
                id: DEV_LOOPBACK.to_owned(),
                proof: Proof::DevLoopback,
                app_id: None,
                valid_until: None,
            });
        }
        Err(AuthnError::Missing)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(header: &Sensitive) -> Result<Sensitive, AuthnError> {
    let v = header.expose().trim();
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Sensitive::new(token.trim()))
        }
        _ => Err(AuthnError::NotBearer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_errors_hide_the_value() {
        let t = bearer(&Sensitive::new("bearer abc.def.ghi")).unwrap();
        assert_eq!(t.expose(), "abc.def.ghi");
        let e = bearer(&Sensitive::new("Basic c2VjcmV0")).unwrap_err();
        assert!(!e.to_string().contains("c2VjcmV0"));
        assert!(bearer(&Sensitive::new("Bearer ")).is_err());
    }

    #[tokio::test]
    async fn a_client_certificate_names_the_caller_read_per_connection_or_from_the_leaf() {
        let a = Authenticator {
            jwt: None,
            dev_loopback: true,
        };
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/ns/a/sa/reader".try_into().unwrap(),
        ));
        p.not_after = rcgen::date_time_ymd(2031, 5, 6);
        let not_after = SystemTime::from(p.not_after);
        let leaf = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let leaf = leaf.der().clone();
        let from_leaf = Credentials {
            client_cert: Some(ClientCert::Leaf(&leaf)),
            remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
            ..Default::default()
        };
        let caller = a.authenticate(&from_leaf).await.unwrap();
        assert_eq!(caller.id, "spiffe://example.org/ns/a/sa/reader");
        assert_eq!(caller.proof, Proof::Mtls);
        assert_eq!(
            caller.valid_until,
            Some(not_after),
            "a watch ends with the certificate"
        );
        // The identity the listener read at the handshake is used as is, also its refusal;
        // a certificate never falls back to the loopback development identity.
        let read = Ok(mtls::CertIdentity {
            id: "dns:svc.example.org".to_owned(),
            not_after: SystemTime::now() + std::time::Duration::from_secs(3600),
        });
        let per_connection = Credentials {
            client_cert: Some(ClientCert::Identity(&read)),
            ..Default::default()
        };
        assert_eq!(
            a.authenticate(&per_connection).await.unwrap().id,
            "dns:svc.example.org"
        );
        // A connection outlives its certificate: each request is checked against the end.
        let expired = Ok(mtls::CertIdentity {
            id: "dns:svc.example.org".to_owned(),
            not_after: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        });
        let on_an_old_connection = Credentials {
            client_cert: Some(ClientCert::Identity(&expired)),
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate(&on_an_old_connection).await,
            Err(AuthnError::Certificate(m)) if m.contains("expired at 2023-11-14T22:13:20Z")
        ));
        let refused = Err("carries neither a SPIFFE ID (URI SAN) nor a DNS name".to_owned());
        let bad = Credentials {
            client_cert: Some(ClientCert::Identity(&refused)),
            remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate(&bad).await,
            Err(AuthnError::Certificate(m)) if m.contains("neither")
        ));
    }

    #[tokio::test]
    async fn dev_identity_needs_the_setting_and_a_loopback_peer() {
        let mut a = Authenticator {
            jwt: None,
            dev_loopback: false,
        };
        let local = Credentials {
            remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate(&local).await,
            Err(AuthnError::Missing)
        ));
        a.dev_loopback = true;
        assert_eq!(a.authenticate(&local).await.unwrap().id, DEV_LOOPBACK);
        let remote = Credentials {
            remote_addr: Some("10.0.0.1:4000".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate(&remote).await,
            Err(AuthnError::Missing)
        ));
    }
}
