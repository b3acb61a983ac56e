//! Azure Key Vault signer through the official SDK crates: certificate metadata from
//! `azure_security_keyvault_certificates`, digest signing from `azure_security_keyvault_keys`.
//! Challenge-resource verification stays on (the SDK default).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::ClientOptions;
use azure_security_keyvault_certificates::models::CertificateClientGetCertificateOptions;
use azure_security_keyvault_certificates::{CertificateClient, CertificateClientOptions};
use azure_security_keyvault_keys::models::{
    KeyClientSignOptions, SignParameters, SignatureAlgorithm,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceId};
use url::Url;

use super::{CertificateInfo, KeyRef, Signer, SignerError};
use crate::config::SigningAlgorithm;

pub const SERVICE: &str = "Key Vault";

/// Signs with Key Vault keys using the broker's managed identity.
pub struct KeyVaultSigner {
    credential: Arc<dyn TokenCredential>,
    client_options: ClientOptions,
    clients: Mutex<HashMap<String, Clients>>,
}

#[derive(Clone)]
struct Clients {
    keys: Arc<KeyClient>,
    certificates: Arc<CertificateClient>,
}

impl std::fmt::Debug for KeyVaultSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultSigner").finish_non_exhaustive()
    }
}

impl KeyVaultSigner {
    pub fn new(credential: Arc<dyn TokenCredential>, client_options: ClientOptions) -> Self {
        KeyVaultSigner {
            credential,
            client_options,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// One pair of SDK clients per vault, reused so their bearer-token caches are too.
    fn clients(&self, vault_url: &Url) -> Result<Clients, SignerError> {
        let key = vault_url.as_str().to_owned();
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let keys = KeyClient::new(
            vault_url.as_str(),
            self.credential.clone(),
            Some(KeyClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            other(format!(
                "cannot create a Key Vault client for {vault_url}: {e}"
            ))
        })?;
        let certificates = CertificateClient::new(
            vault_url.as_str(),
            self.credential.clone(),
            Some(CertificateClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            other(format!(
                "cannot create a Key Vault client for {vault_url}: {e}"
            ))
        })?;
        let c = Clients {
            keys: Arc::new(keys),
            certificates: Arc::new(certificates),
        };
        map.insert(key, c.clone());
        Ok(c)
    }
}

#[async_trait]
impl Signer for KeyVaultSigner {
    async fn certificate(
        &self,
        vault_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError> {
        let clients = self.clients(vault_url)?;
        let cert = clients
            .certificates
            .get_certificate(
                name,
                Some(CertificateClientGetCertificateOptions::default()),
            )
            .await
            .map_err(|e| classify(e, &format!("certificate {name}")))?
            .into_model()
            .map_err(|e| other(format!("unreadable certificate {name}: {e}")))?;
        let cer = cert
            .cer
            .ok_or_else(|| other(format!("certificate {name} has no public part (cer)")))?;
        let kid = cert
            .kid
            .ok_or_else(|| other(format!("certificate {name} has no key id (kid)")))?;
        let rid = ResourceId::from_str(&kid)
            .map_err(|e| other(format!("certificate {name} has an unreadable kid: {e}")))?;
        let version = rid
            .version
            .ok_or_else(|| other(format!("certificate {name}'s kid has no version")))?;
        if cert.attributes.as_ref().and_then(|a| a.enabled) == Some(false) {
            return Err(SignerError::NotFound {
                service: SERVICE,
                what: format!("an enabled version of certificate {name}"),
                code: "CertificateDisabled".into(),
                message: "the current version is disabled".into(),
            });
        }
        let not_after =
            cert.attributes.as_ref().and_then(|a| a.expires).map(|t| {
                std::time::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
            });
        let key = KeyRef {
            vault_url: vault_url.clone(),
            name: rid.name,
            version,
        };
        Ok(CertificateInfo::of_der(&cer, key, not_after))
    }

    async fn sign(
        &self,
        key: &KeyRef,
        algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        let clients = self.clients(&key.vault_url)?;
        let params = SignParameters {
            algorithm: Some(match algorithm {
                SigningAlgorithm::RS256 => SignatureAlgorithm::Rs256,
                SigningAlgorithm::PS256 => SignatureAlgorithm::Ps256,
            }),
            value: Some(digest.to_vec()),
        };
        let body = params
            .try_into()
            .map_err(|e: azure_core::Error| other(format!("cannot encode sign request: {e}")))?;
        let result = clients
            .keys
            .sign(
                &key.name,
                body,
                Some(KeyClientSignOptions {
                    key_version: Some(key.version.clone()),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| classify(e, &format!("key {}/{}", key.name, key.version)))?
            .into_model()
            .map_err(|e| other(format!("unreadable sign response: {e}")))?;
        result
            .result
            .filter(|s| !s.is_empty())
            .ok_or_else(|| other("Key Vault returned no signature".into()))
    }
}

fn other(message: String) -> SignerError {
    SignerError::Other {
        service: SERVICE,
        message,
    }
}

/// Maps an SDK error to the broker's classification, keeping Key Vault's own error code.
fn classify(e: azure_core::Error, what: &str) -> SignerError {
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let status = u16::from(*status);
            let code = error_code.clone().unwrap_or_default();
            let message = raw_response
                .as_ref()
                .and_then(|r| service_message(r.body()))
                .unwrap_or_else(|| e.to_string());
            let retry_after = raw_response.as_ref().and_then(|r| retry_after(r.headers()));
            match status {
                401 | 403 => SignerError::Forbidden {
                    service: SERVICE,
                    status,
                    code,
                    message,
                },
                404 => SignerError::NotFound {
                    service: SERVICE,
                    what: what.to_owned(),
                    code,
                    message,
                },
                408 | 429 | 500..=599 => SignerError::Unavailable {
                    service: SERVICE,
                    message: format!("HTTP {status} {code}: {message}"),
                    retry_after,
                },
                _ => other(format!("HTTP {status} {code}: {message}")),
            }
        }
        ErrorKind::Credential => SignerError::Identity(root_message(&e)),
        ErrorKind::Connection | ErrorKind::Io => SignerError::Unavailable {
            service: SERVICE,
            message: crate::outbound::with_dns_hint(root_message(&e)),
            retry_after: None,
        },
        _ => other(root_message(&e)),
    }
}

/// Key Vault errors are `{"error":{"code","message"}}`; the message is what a person needs.
fn service_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("error")?
        .get("message")?
        .as_str()
        .map(|s| s.chars().take(500).collect())
}

fn retry_after(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    crate::resilience::retry_after(
        |name| {
            headers
                .iter()
                .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str().to_owned())
        },
        std::time::SystemTime::now(),
    )
}

/// The innermost error message: `azure_core` nests the useful text under its own context.
pub(crate) fn root_message(e: &azure_core::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = s.to_string();
        source = s.source();
    }
    msg.chars().take(500).collect()
}
