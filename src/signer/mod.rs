//! The `Signer` seam: certificate metadata and digest signing by a key that never leaves
//! its vault. `keyvault` is the Azure Key Vault implementation, `pkcs11` the one for
//! hardware security modules.

pub mod keyvault;
pub mod pkcs11;

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use url::Url;

use crate::config::SigningAlgorithm;

/// What the broker needs to know about a certificate to build an assertion header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// base64url SHA-1 of the DER certificate (`x5t`).
    pub x5t: String,
    /// base64url SHA-256 of the DER certificate (`x5t#S256`).
    pub x5t_s256: String,
    /// The signing key: name and version, in the vault that holds the certificate.
    pub key: KeyRef,
    /// The certificate version (equal to the key version in Key Vault).
    pub version: String,
    /// When the certificate stops being valid, if known.
    pub not_after: Option<SystemTime>,
}

impl CertificateInfo {
    /// The metadata of the DER certificate `der` whose key is `key`: its thumbprints, and
    /// the key's version as the certificate's.
    pub fn of_der(der: &[u8], key: KeyRef, not_after: Option<SystemTime>) -> Self {
        use base64::Engine;
        use sha1::Sha1;
        use sha2::{Digest, Sha256};
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        CertificateInfo {
            x5t: b64.encode(Sha1::digest(der)),
            x5t_s256: b64.encode(Sha256::digest(der)),
            version: key.version.clone(),
            key,
            not_after,
        }
    }
}

/// A key in a vault, pinned to a version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub vault_url: Url,
    pub name: String,
    pub version: String,
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}keys/{}/{}",
            self.vault_url.as_str().trim_end_matches('/').to_owned() + "/",
            self.name,
            self.version
        )
    }
}

/// `403 Forbidden`, or the code alone for a signer that has no HTTP status (0: an HSM).
fn status_and(status: u16, code: &str) -> String {
    if status == 0 {
        code.to_owned()
    } else {
        format!("{status} {code}")
    }
}

/// Key Vault (or another signer) failures, classified for the API edge and retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignerError {
    /// The broker's identity may not use this key or certificate (RBAC), or its token was refused.
    #[error("{service} refused the broker's identity ({}): {message}", status_and(*status, code))]
    Forbidden {
        service: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    /// The certificate or key does not exist (or the configured name is wrong).
    #[error("{what} was not found in {service} ({code}): {message}")]
    NotFound {
        service: &'static str,
        what: String,
        code: String,
        message: String,
    },
    /// Throttled (429) or temporarily unavailable (5xx, connection failure, timeout).
    #[error("{service} is unavailable or throttling: {message}")]
    Unavailable {
        service: &'static str,
        message: String,
        retry_after: Option<Duration>,
        /// Throttled (429): the service asks every caller of it to wait, not only this call.
        throttled: bool,
    },
    /// What the tenant's credential names cannot work as it is: Key Vault refused the request
    /// (a 4xx such as a key whose type does not fit the algorithm), or the token's objects
    /// cannot be paired up. An operator must fix it; asking again will not.
    #[error("{service} cannot be used as configured ({code}): {message}")]
    Configuration {
        service: &'static str,
        code: String,
        message: String,
    },
    /// The broker could not get its own managed identity token (Key Vault's alone: the HSM
    /// takes a PIN), with the answer's retry hint (Entra's or the endpoint's), which the
    /// broker's retries honour: the credential retries nothing itself.
    #[error("the managed identity token for Key Vault is unavailable: {message}")]
    Identity {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The managed identity endpoint refused the broker's own identity (400, 401 or 403 with
    /// its own error: IMDS's "Identity not found"): `identity.client_id` names no identity
    /// assigned to the host, or (`unnamed`) names none and the host has several user-assigned
    /// identities. Asking again will not help.
    #[error(
        "the managed identity endpoint refused the broker's identity for Key Vault (HTTP {status}): {message}"
    )]
    IdentityNotAssigned {
        status: u16,
        message: String,
        unnamed: bool,
    },
    /// Entra refused the broker's own workload identity for a reason of configuration (the
    /// app's federated credential does not match the cluster's token, say: AADSTS700213):
    /// an answer of 4xx whose code is one of configuration or unknown. Retrying will not
    /// help; Entra's answer as the broker reads its own (`entra::answer_to_sdk`).
    #[error("the broker's workload identity was refused: {0}")]
    IdentityRefused(Box<crate::entra::EntraError>),
    /// Anything else: a malformed response, an unexpected status.
    #[error("{service} failed: {message}")]
    Other {
        service: &'static str,
        message: String,
    },
}

impl SignerError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SignerError::Unavailable { .. })
    }
}

/// Reads certificate metadata and signs digests; the private key never leaves the vault.
#[async_trait]
pub trait Signer: Send + Sync + fmt::Debug + 'static {
    /// The current version of a certificate and its thumbprints.
    async fn certificate(
        &self,
        vault_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError>;

    /// Signs a SHA-256 digest with a pinned key version.
    async fn sign(
        &self,
        key: &KeyRef,
        algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError>;
}
