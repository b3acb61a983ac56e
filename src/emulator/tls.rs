//! TLS for the Key Vault and Entra listener: a throwaway CA generated at each start and a
//! server certificate for loopback plus the real Azure host names, so that clients which pin
//! `*.vault.azure.net` / `login.microsoftonline.com` to loopback keep hostname and
//! challenge-resource verification on. Uses the aws-lc-rs provider only.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::error::EmulatorError;

/// Names on the server certificate.
const SERVER_NAMES: &[&str] = &[
    "127.0.0.1",
    "::1",
    "localhost",
    "*.vault.azure.net",
    "login.microsoftonline.com",
];

/// The CA (PEM, to hand to clients) and a rustls server config presenting a leaf it signed.
pub(crate) struct TlsMaterial {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

pub(crate) fn generate() -> Result<TlsMaterial, EmulatorError> {
    let now = time::OffsetDateTime::now_utc();
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;

    let ca_key = rcgen::KeyPair::generate_for(alg).map_err(EmulatorError::crypto)?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(EmulatorError::crypto)?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "tokenbroker emulator CA (throwaway)",
    );
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - time::Duration::hours(1);
    ca_params.not_after = now + time::Duration::days(30);
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(EmulatorError::crypto)?;

    let leaf_key = rcgen::KeyPair::generate_for(alg).map_err(EmulatorError::crypto)?;
    let names: Vec<String> = SERVER_NAMES.iter().map(|s| (*s).to_owned()).collect();
    let mut leaf_params = rcgen::CertificateParams::new(names).map_err(EmulatorError::crypto)?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tokenbroker emulator");
    leaf_params.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.not_before = now - time::Duration::hours(1);
    leaf_params.not_after = now + time::Duration::days(30);
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .map_err(EmulatorError::crypto)?;

    let chain = vec![leaf.der().clone(), CertificateDer::from(ca.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(EmulatorError::crypto)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(EmulatorError::crypto)?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    Ok(TlsMaterial {
        ca_pem: ca.pem(),
        server_config: Arc::new(server_config),
    })
}
